"""The tutorial's code runs, its checks pass, and the output it shows is what the code prints now."""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
sys.path.insert(0, str(DOCS))

import build  # noqa: E402  (docs/build.py)


def test_every_block_runs_and_the_shown_output_is_current():
    text = build.TUTORIAL.read_text()
    assert text.count("```python") >= 10
    rendered = build.render(text)  # runs every block; a failing check raises here
    assert rendered == text, "docs/tutorial.md shows stale output: run `python docs/build.py`"


def test_the_figures_are_drawn_by_the_script(tmp_path):
    build.figures(tmp_path)
    for name in ("nf4_levels.png", "delta_w.png", "fused_qkv.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
        assert f"figures/{name}" in build.TUTORIAL.read_text()
