"""The course as Jupyter notebooks, generated from its sources, so there is no second copy to keep
in sync:

    docs/lora-in-20-lines.md                 -> docs/notebooks/00-lora-in-20-lines.ipynb
    docs/tutorial.md                         -> docs/notebooks/01-tutorial.ipynb
    docs/exercises/exNN_name.py (the stub)   -> docs/notebooks/exercises/exNN_name.ipynb
    docs/exercises/solutions/exNN_name.py    -> docs/notebooks/exercises/solutions/exNN_name.ipynb

A page becomes one markdown cell per stretch of text and one code cell per python block (the
output blocks are left out: running the notebook prints them). An exercise becomes four cells:
its task (the module's docstring), its code (the stub to fill in, or the solution), its tests'
description, and its tests with a loop that runs each one on the code above.

    python docs/notebooks.py           write docs/notebooks/
    python docs/notebooks.py --check   exit 1 if a notebook there is not what its source gives

tests/test_notebooks.py checks that the notebooks are current and executes them in a Jupyter
kernel: a page's notebook must print what the page's output blocks show, and every solution's
notebook must pass its tests.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build  # noqa: E402  (docs/build.py: the pages' fenced blocks)

DOCS = Path(__file__).resolve().parent
OUT = DOCS / "notebooks"
EXERCISES = DOCS / "exercises"
PAGES = {"00-lora-in-20-lines": DOCS / "lora-in-20-lines.md", "01-tutorial": DOCS / "tutorial.md"}
LINK = re.compile(r"(\]\()([^)#\s]+)")  # the target of a markdown link or image, up to an anchor
KERNEL = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
          "language_info": {"name": "python"}}


def cell(kind: str, source: str, n: int) -> dict:
    """One nbformat 4.5 cell; its id is its position, so that the same source gives the same file."""
    made = {"cell_type": kind, "id": f"cell-{n}", "metadata": {}, "source": source.strip("\n")}
    if kind == "code":
        made.update(execution_count=None, outputs=[])
    return made


def notebook(cells: list[tuple[str, str]]) -> dict:
    """An nbformat 4.5 notebook of (kind, source) cells."""
    return {"cells": [cell(kind, source, n) for n, (kind, source) in enumerate(cells)],
            "metadata": KERNEL, "nbformat": 4, "nbformat_minor": 5}


def relink(markdown: str, depth: int) -> str:
    """Relative links of a docs/ page, made relative to a notebook `depth` folders below docs/."""
    def fix(match):
        target = match.group(2)
        if "://" in target or target.startswith(("mailto:", "/")):
            return match.group(0)
        below = "notebooks/" + "exercises/" * (depth - 1)
        if target.startswith(below):  # another notebook of the same folder
            return match.group(1) + target.removeprefix(below)
        return match.group(1) + "../" * depth + target

    return LINK.sub(fix, markdown)


def page_cells(page: Path) -> list[tuple[str, str]]:
    """A page's text and python blocks as (kind, source) cells, in order; output blocks dropped."""
    text, cells, last = page.read_text(), [], 0
    for fence in build.fences(text):
        if fence.lang not in ("python", "output"):
            continue
        prose = text[last:fence.start].strip()
        if prose:
            cells.append(("markdown", relink(prose, 1)))
        if fence.lang == "python":
            cells.append(("code", fence.code))
        last = fence.end
    if text[last:].strip():
        cells.append(("markdown", relink(text[last:].strip(), 1)))
    return cells


def split_docstring(path: Path) -> tuple[str, str]:
    """A module's docstring and the code after it."""
    source = path.read_text()
    tree = ast.parse(source)
    first = tree.body[0] if tree.body else None
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)):
        return "", source
    lines = source.splitlines(keepends=True)
    return first.value.value, "".join(lines[first.end_lineno:])


RUN_TESTS = '''
import types

ex = types.SimpleNamespace(**globals())  # the code above, as the tests' `ex`
for name, test in [(name, value) for name, value in globals().items() if name.startswith("test_") and callable(value)]:
    test(ex)
    print("passed:", name)
'''


def exercise_cells(name: str, solution: bool) -> list[tuple[str, str]]:
    """One exercise as a notebook: its task, its stub (or solution), and its tests run on that code."""
    code_file = (EXERCISES / "solutions" if solution else EXERCISES) / f"{name}.py"
    task, code = split_docstring(code_file)
    checks, tests = split_docstring(EXERCISES / f"test_{name}.py")
    how = ("This is the worked solution." if solution else
           "Fill in the code cell below, run it, then run the tests' cell; each test prints `passed:` "
           "when your code passes it.")
    return [("markdown", f"{task.strip()}\n\n*{how}*"), ("code", code),
            ("markdown", f"## The tests\n\n{checks.strip()}"), ("code", tests.rstrip() + "\n" + RUN_TESTS)]


def exercises() -> list[str]:
    """The exercises' names (exNN_name), in order."""
    return sorted(p.stem for p in EXERCISES.glob("ex[0-9][0-9]_*.py"))


def generate() -> dict[Path, str]:
    """Every notebook's path and its text (JSON, one-space indents, as Jupyter writes it)."""
    made = {OUT / f"{stem}.ipynb": notebook(page_cells(page)) for stem, page in PAGES.items()}
    for name in exercises():
        made[OUT / "exercises" / f"{name}.ipynb"] = notebook(exercise_cells(name, solution=False))
        made[OUT / "exercises" / "solutions" / f"{name}.ipynb"] = notebook(exercise_cells(name, solution=True))
    return {path: json.dumps(nb, indent=1, ensure_ascii=False) + "\n" for path, nb in made.items()}


def stale() -> list[Path]:
    """Notebooks missing, different from what their sources give, or left over from a removed source."""
    made = generate()
    wrong = [path for path, text in made.items() if not path.exists() or path.read_text() != text]
    extra = [path for path in OUT.rglob("*.ipynb") if path not in made]
    return wrong + extra


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        wrong = stale()
        for path in wrong:
            print(f"stale: {path.relative_to(DOCS.parent)} (run python docs/notebooks.py)")
        return 1 if wrong else 0
    if argv:
        print(__doc__)
        return 2
    made = generate()
    for path in OUT.rglob("*.ipynb"):
        if path not in made:
            path.unlink()
    for path, text in made.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(DOCS.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
