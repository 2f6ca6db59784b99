"""The top-level kernels/ folder installs as minilora.kernels, never as a module named `kernels`."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_no_top_level_kernels(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path)],
        check=True,
    )
    (wheel,) = tmp_path.glob("minilora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "kernels" not in tops
    sources = {f"minilora/{p.relative_to(ROOT / 'minilora').as_posix()}" for p in (ROOT / "minilora").rglob("*.py")}
    sources |= {f"minilora/kernels/{p.relative_to(ROOT / 'kernels').as_posix()}" for p in (ROOT / "kernels").rglob("*.py")}
    assert sources - set(names) == set()  # every source file ships: no subpackage forgotten in pyproject.toml
    assert any(n.endswith("entry_points.txt") for n in names)


def test_minilora_kernels_imports_and_kernels_is_not_ours():
    import minilora.kernels

    assert Path(minilora.kernels.__file__).parent == ROOT / "kernels"
    spec = importlib.util.find_spec("kernels")  # Hugging Face's package, if anything
    assert spec is None or Path(spec.origin).parent != ROOT / "kernels"


def test_no_script_folder_holds_a_module_named_kernels():
    """`python benchmarks/x.py` puts benchmarks/ first on sys.path: a kernels.py there would be the
    `kernels` that bitsandbytes and transformers import while the benchmark runs."""
    script_folders = [ROOT / "benchmarks", ROOT / "docs", ROOT / "tests"]
    found = [p for folder in script_folders for p in (folder / "kernels.py", folder / "kernels")]
    assert [str(p.relative_to(ROOT)) for p in found if p.exists()] == []
