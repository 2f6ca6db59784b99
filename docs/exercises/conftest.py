"""The `ex` fixture: the module a test file checks.

`test_ex03_fused_qkv.py` checks `ex03_fused_qkv.py`, the stub you edit, found beside this file.
With the environment variable MINILORA_EXERCISES=solutions it checks `solutions/ex03_fused_qkv.py`
instead (how a teacher checks that the tests pass on the worked solutions).
"""

import contextlib
import importlib.util
import os
import warnings
from pathlib import Path

import pytest
import torch

# minilora's Triton kernels run on CPU tensors through Triton's interpreter when no GPU is present;
# the switch is read when a kernel is defined, so it is set before minilora is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore", message=".*shares its weight with the input embeddings.*")

HERE = Path(__file__).resolve().parent


def load_exercise(name: str, which: str = "stub"):
    """Import exercise `name` ("ex03_fused_qkv") from this folder ("stub") or from solutions/
    ("solutions"), under a module name of its own so a stub and its solution never collide."""
    folder = HERE / "solutions" if which == "solutions" else HERE
    path = folder / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"no exercise {name!r} in {folder}")
    spec = importlib.util.spec_from_file_location(f"minilora_exercise_{which}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def ex(request):
    """The module under test: the stub, or its solution with MINILORA_EXERCISES=solutions."""
    name = Path(str(request.node.fspath)).stem.removeprefix("test_")
    which = "solutions" if os.environ.get("MINILORA_EXERCISES") == "solutions" else "stub"
    return load_exercise(name, which)


@contextlib.contextmanager
def one_thread():
    """The exercises' tensors are tiny: one CPU thread computes them fastest (a pool of threads only
    adds overhead, and a lot of it on a busy machine). The setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def each_test_on_one_thread():
    with one_thread():
        yield
