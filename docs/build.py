"""Runs the code blocks of every documentation page, writes their printed output under each block,
and draws the tutorial's figures. `python docs/build.py` after editing a page (README.md or
docs/**/*.md); the tests (tests/test_docs.py) fail when a block fails or when the printed output in a
page is not what its code prints now.

    ```python            a block the build runs: a page's blocks share one namespace, in order,
    ...                  with the current directory a fresh temporary directory
    ```
    ```output            written by the build: what the block above printed
    ...
    ```

`python docs/build.py docs/qlora.md README.md` rebuilds only those pages. Pages under
docs/exercises/ are not run: their blocks are stubs for the reader to fill.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
TUTORIAL = DOCS / "tutorial.md"
README = ROOT / "README.md"
NOT_RUN = ("exercises",)  # folders of docs/ whose python blocks are not run
OPEN = re.compile(r"^( *)(`{3,})([\w+-]*)[^`\n]*$")


@dataclass
class Fence:
    """A fenced block of a page: its language, its text (dedented) and where it sits."""

    lang: str
    code: str
    indent: str
    start: int  # offset of the opening fence's line
    end: int  # offset just after the closing fence's line (and its newline)
    line: int  # 1-based line of the opening fence


def fences(text: str) -> list[Fence]:
    """Every fenced block of a markdown text, in order (an unclosed fence runs to the end of the text)."""
    found, offset, lines = [], 0, text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        match = OPEN.match(lines[i].rstrip("\n"))
        if not match:
            offset += len(lines[i])
            i += 1
            continue
        indent, ticks, lang = match.groups()
        start, first = offset, i
        offset += len(lines[i])
        i += 1
        body = []
        while i < len(lines):
            line = lines[i]
            offset += len(line)
            i += 1
            if line.strip() == ticks and line.startswith(indent):
                break
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip(" "))
        found.append(Fence(lang, "".join(body), indent, start, offset, first + 1))
    return found


def pages(root: Path = ROOT) -> list[Path]:
    """The documentation pages: README.md and every markdown file under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def runs(page: Path) -> bool:
    """Whether the build runs a page's python blocks (not the exercises' stubs)."""
    parts = page.resolve().relative_to(DOCS).parts if page.resolve().is_relative_to(DOCS) else ()
    return not (parts and parts[0] in NOT_RUN)


def python_blocks(text: str) -> list[tuple[Fence, Fence | None]]:
    """Each python block with the output block right under it, if there is one."""
    blocks, pairs = fences(text), []
    for i, fence in enumerate(blocks):
        if fence.lang != "python":
            continue
        after = blocks[i + 1] if i + 1 < len(blocks) else None
        shown = after if after is not None and after.lang == "output" and after.start == fence.end else None
        pairs.append((fence, shown))
    return pairs


def run_blocks(text: str, name: str = TUTORIAL.name, workdir: str | Path | None = None) -> list[tuple[str, str]]:
    """(code, printed output) of every python block of a page, run in order in one namespace, with
    the current directory `workdir` (default: a fresh temporary directory, removed afterwards) and
    torch's and Python's random generators seeded with 0. A failing block raises, its traceback
    naming the page, the block and its line."""
    namespace: dict = {"__name__": Path(name).stem.replace("-", "_")}
    results = []
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="minilora-docs-"))
        stack.enter_context(contextlib.chdir(workdir))
        _seed()
        for n, (fence, _) in enumerate(python_blocks(text), 1):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = compile(fence.code, f"{name} block {n} (line {fence.line})", "exec")
                exec(code, namespace)  # noqa: S102
            results.append((fence.code, out.getvalue()))
    return results


def _seed() -> None:
    random.seed(0)
    with contextlib.suppress(ImportError):
        import torch

        torch.manual_seed(0)


def render(text: str, name: str = TUTORIAL.name, workdir: str | Path | None = None) -> str:
    """The page with every output block recomputed: written under each python block that prints,
    removed under one that prints nothing."""
    pairs = python_blocks(text)
    outputs = run_blocks(text, name, workdir)
    pieces, last = [], 0
    for (fence, shown), (_, printed) in zip(pairs, outputs):
        end = shown.end if shown is not None else fence.end
        pieces.append(text[last:fence.end])
        if printed:
            body = textwrap.indent(printed if printed.endswith("\n") else printed + "\n", fence.indent,
                                   lambda line: line.strip() != "")
            pieces.append(f"{fence.indent}```output\n{body}{fence.indent}```\n")
        last = end
    pieces.append(text[last:])
    return "".join(pieces)


def figures(out: Path = DOCS / "figures") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from minilora.quant import NF4_LEVELS

    fig, ax = plt.subplots(figsize=(7, 3))
    x = torch.linspace(-1.1, 1.1, 400)
    sigma = 1 / 2.5  # a normal rescaled so that ±2.5σ fills [-1, 1], for the picture only
    ax.plot(x, torch.exp(-(x / sigma) ** 2 / 2), color="gray", label="normal density (rescaled)")
    ax.vlines(NF4_LEVELS, 0, 1.05, colors="tab:blue", label="16 NF4 levels")
    ax.set(xlabel="w / absmax(block)", yticks=[], title="NF4: dense near zero, where the weights are")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "nf4_levels.png", dpi=100)

    fig, axes = plt.subplots(1, 3, figsize=(7, 3), gridspec_kw={"width_ratios": [1, 0.25, 1]})
    torch.manual_seed(0)
    B, A = torch.randn(12, 2), torch.randn(2, 10)
    for ax, m, title in zip(axes, (B @ A, None, None), ("ΔW = B·A  (12×10, rank 2)", "", "")):
        if m is not None:
            ax.imshow(m, cmap="coolwarm")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    axes[1].imshow(B, cmap="coolwarm")
    axes[1].set_title("B (12×2)", fontsize=9)
    axes[2].imshow(A, cmap="coolwarm", aspect=0.4)
    axes[2].set_title("A (2×10)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "delta_w.png", dpi=100)

    fig, ax = plt.subplots(figsize=(7, 1.8))
    for i, (name, color, touched) in enumerate((("q", "tab:orange", True), ("k", "lightgray", False),
                                                ("v", "tab:green", True))):
        ax.barh(0, 1, left=i, color=color, edgecolor="black")
        ax.text(i + 0.5, 0, f"{name}\n" + ("+ (α/r)·x·A_{}ᵀ·B_{}ᵀ".format(name, name) if touched else "untouched"),
                ha="center", va="center", fontsize=9)
    ax.set(xlim=(0, 3), yticks=[], xticks=[0, 1, 2, 3], xticklabels=["0", "d", "2d", "3d"],
           title="GPT-2 c_attn output columns: LoRA on the Q and V slices only")
    fig.tight_layout()
    fig.savefig(out / "fused_qkv.png", dpi=100)
    plt.close("all")


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT))
    chosen = [Path(p).resolve() for p in (sys.argv[1:] if argv is None else argv)] or pages()
    for page in chosen:
        if not runs(page):
            continue
        text = page.read_text()
        rendered = render(text, str(page.relative_to(ROOT)))
        if rendered != text:
            page.write_text(rendered)
            print(f"wrote {page.relative_to(ROOT)}")
    if argv is None and len(sys.argv) == 1:
        figures()
        print(f"drew {DOCS / 'figures'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
