"""The course's notebooks (docs/notebooks/) are what their sources give, and they run in a Jupyter
kernel: a page's notebook prints what the page's output blocks show; every exercise's worked
solution passes its tests there.

The pages themselves (docs/lora-in-20-lines.md, docs/tutorial.md) are run here, as notebooks, and
not again by tests/test_docs.py: one run checks the code, the printed output and the notebook."""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

DOCS = Path(__file__).resolve().parents[1] / "docs"
sys.path.insert(0, str(DOCS))

import build  # noqa: E402  (docs/build.py)
import notebooks  # noqa: E402  (docs/notebooks.py)

GENERATED = notebooks.generate()
KERNEL = "minilora-tests"


@pytest.fixture(scope="module", autouse=True)
def this_environment_s_kernel(tmp_path_factory):
    """A kernel spec that runs this Python (the one with minilora and the test extras), found first
    through JUPYTER_PATH: a machine-wide "python3" kernel of another Python is never picked."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "minilora tests", "language": "python"}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(root))
        yield


def execute(nb: dict, workdir: Path) -> dict:
    """Run every cell in a fresh kernel of this environment, in `workdir`; a failing cell raises."""
    node = nbformat.from_dict(nb)
    NotebookClient(node, timeout=900, kernel_name=KERNEL, resources={"metadata": {"path": str(workdir)}}).execute()
    return node


def printed(cell) -> str:
    """What a code cell printed to stdout."""
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


def test_the_notebooks_are_current_and_valid():
    assert notebooks.stale() == [], "docs/notebooks/ is stale: run `python docs/notebooks.py`"
    for text in GENERATED.values():
        nbformat.validate(nbformat.reads(text, as_version=4))
    assert len(notebooks.exercises()) >= 10
    assert {p.name for p in GENERATED} >= {"00-lora-in-20-lines.ipynb", "01-tutorial.ipynb"}


def test_a_notebook_keeps_every_block_and_every_word_of_its_page():
    page = notebooks.PAGES["01-tutorial"]
    nb = json.loads(GENERATED[notebooks.OUT / "01-tutorial.ipynb"])
    code = [c["source"] for c in nb["cells"] if c["cell_type"] == "code"]
    assert code == [f.code.strip("\n") for f in build.fences(page.read_text()) if f.lang == "python"]
    prose = "\n".join(c["source"] for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "## 9. Catastrophic forgetting" in prose and "](../figures/nf4_levels.png)" in prose
    assert "](../lora-in-20-lines.md)" in prose  # links still reach their pages from docs/notebooks/


@pytest.mark.parametrize("stem", sorted(notebooks.PAGES))
def test_a_page_s_notebook_prints_what_the_page_shows(stem, tmp_path):
    page = notebooks.PAGES[stem]
    shown = [(shown.code if shown else "") for _, shown in build.python_blocks(page.read_text())]
    run = execute(json.loads(GENERATED[notebooks.OUT / f"{stem}.ipynb"]), tmp_path)
    got = [printed(c) for c in run.cells if c.cell_type == "code"]
    assert len(got) == len(shown)
    for n, (expected, actual) in enumerate(zip(shown, got), 1):
        assert actual == expected, f"{page.name} block {n}: the notebook printed something else than the page shows " \
                                   "(run `python docs/build.py` and `python docs/notebooks.py`)"


def exercise_notebooks(folder: Path) -> dict:
    """The code cells of every exercise notebook in `folder`, one notebook after another in one
    notebook (a kernel per notebook would cost seconds each), with `%reset -f` before each so that
    none sees another's names."""
    cells = []
    for name in notebooks.exercises():
        nb = json.loads(GENERATED[folder / f"{name}.ipynb"])
        cells += [notebooks.cell("code", "%reset -f", 0)] + [c for c in nb["cells"] if c["cell_type"] == "code"]
    cells = [{**c, "id": f"cell-{n}"} for n, c in enumerate(cells)]  # ids unique in the joined notebook
    return {**notebooks.notebook([]), "cells": cells}


def test_every_untouched_stub_notebook_fails_its_tests(tmp_path):
    """A student's notebook as handed out: its code cell runs (it only defines), its tests' cell
    fails on the first test with the stub's NotImplementedError."""
    names = notebooks.exercises()
    node = nbformat.from_dict(exercise_notebooks(notebooks.OUT / "exercises"))
    NotebookClient(node, timeout=900, kernel_name=KERNEL, allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [out for c in node.cells for out in c.outputs if out.output_type == "error"]
    assert [e.ename for e in errors] == ["NotImplementedError"] * len(names)
    assert not any(line.startswith("passed:") for c in node.cells for line in printed(c).splitlines())


def test_every_worked_solution_passes_its_tests_in_a_kernel(tmp_path):
    names = notebooks.exercises()
    run = execute(exercise_notebooks(notebooks.OUT / "exercises" / "solutions"), tmp_path)
    passed = [line for c in run.cells for line in printed(c).splitlines() if line.startswith("passed:")]
    expected = sum(1 for name in names for line in (DOCS / "exercises" / f"test_{name}.py").read_text().splitlines()
                   if line.startswith("def test_"))
    assert len(passed) == expected
