"""Runs the tutorial's code blocks, writes their printed output under each block, and draws the
figures. `python docs/build.py` after editing docs/tutorial.md; the tests fail when the printed
output in the file is not what the code prints now.

    ```python            a block the build runs (all blocks share one namespace, in order)
    ...
    ```
    ```output            written by the build: what the block above printed
    ...
    ```
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

DOCS = Path(__file__).parent
TUTORIAL = DOCS / "tutorial.md"
BLOCK = re.compile(r"```python\n(.*?)```\n(?:```output\n.*?```\n)?", re.S)


def run_blocks(text: str) -> list[tuple[str, str]]:
    """(code, printed output) of every python block, run in order in one namespace."""
    namespace: dict = {"__name__": "tutorial"}
    results = []
    for match in BLOCK.finditer(text):
        code = match.group(1)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"{TUTORIAL.name} block {len(results) + 1}", "exec"), namespace)  # noqa: S102
        results.append((code, out.getvalue()))
    return results


def render(text: str) -> str:
    """The tutorial with every output block recomputed."""
    outputs = iter(run_blocks(text))

    def replace(match):
        code, printed = next(outputs)
        block = f"```python\n{code}```\n"
        return block + (f"```output\n{printed}```\n" if printed else "")

    return BLOCK.sub(replace, text)


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


def main() -> int:
    sys.path.insert(0, str(DOCS.parent))
    TUTORIAL.write_text(render(TUTORIAL.read_text()))
    figures()
    print(f"wrote {TUTORIAL} and {DOCS / 'figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
