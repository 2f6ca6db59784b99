"""The top-level kernels/ folder installs as minilora.kernels, never as a module named `kernels`."""

import importlib.metadata
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

    assert Path(minilora.kernels.ops.__file__).parent == ROOT / "kernels"
    spec = importlib.util.find_spec("kernels")  # Hugging Face's package, if anything
    assert spec is None or Path(spec.origin).parent != ROOT / "kernels"


def test_no_script_folder_holds_a_module_named_kernels():
    """`python benchmarks/x.py` puts benchmarks/ first on sys.path: a kernels.py there would be the
    `kernels` that bitsandbytes and transformers import while the benchmark runs."""
    script_folders = [ROOT / "benchmarks", ROOT / "docs", ROOT / "tests"]
    found = [p for folder in script_folders for p in (folder / "kernels.py", folder / "kernels")]
    assert [str(p.relative_to(ROOT)) for p in found if p.exists()] == []


def pinned_versions() -> dict[str, str]:
    """requirements/tested.txt: normalized package name -> pinned version."""
    pins = {}
    for line in (ROOT / "requirements" / "tested.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonical(name)] = version.strip()
    return pins


def canonical(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower().strip()


def test_every_dependency_of_the_test_extras_is_in_the_pinned_versions():
    """Adding a dependency without `make pin` would leave it floating on every fresh machine."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    names = {canonical(re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]) for spec in wanted}
    assert names - {"torch"} - set(pinned_versions()) == set()


def test_the_installed_versions_are_the_pinned_versions():
    """`make test` installs within requirements/tested.txt and says so (MINILORA_TESTED_SET);
    `make test-latest` runs on the newest releases and leaves it empty."""
    import os

    import pytest

    if not os.environ.get("MINILORA_TESTED_SET"):
        pytest.skip("runs under `make test`, which installs the tested set")
    def installed(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    drift = {name: (version, installed(name)) for name, version in pinned_versions().items()
             if installed(name) != version}
    assert drift == {}, f"installed versions differ from requirements/tested.txt (pinned, installed): {drift}"
