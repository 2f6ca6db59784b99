"""Python started in the checkout has the repository root on sys.path (`python -m`, `python -c`,
`torchrun -m`, a notebook). The top-level kernels/ folder must never be the `kernels` that
transformers and bitsandbytes import there: Hugging Face's `kernels` package has that name."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

from conftest import gpt2_model_dir, instruction_files

ROOT = Path(__file__).resolve().parents[1]


def from_root(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run this interpreter with `args` in the repository root, as a user typing there would."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_hugging_face_kernels_is_installed_so_these_tests_mean_something():
    assert importlib.metadata.version("kernels")  # transformers >= 5.25 depends on it


def test_transformers_loads_model_classes_from_the_root():
    result = from_root("-c", "from transformers import GPT2LMHeadModel, LlamaForCausalLM; "
                             "import kernels, pathlib; print(pathlib.Path(kernels.__file__).parent)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert Path(result.stdout.strip()) != ROOT / "kernels"


def test_bitsandbytes_imports_from_the_root_without_a_failed_kernels_import():
    result = from_root("-c", "import bitsandbytes")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "get_kernel" not in result.stderr and "CUDAProperties" not in result.stderr


def test_the_cli_runs_as_a_module_from_the_root():
    result = from_root("-m", "minilora.cli", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: minilora" in result.stdout and "finetune" in result.stdout


def test_the_folder_is_not_a_regular_package():
    """A kernels/__init__.py would make the folder a regular package that wins over nothing and loses
    to nothing: first on sys.path, it would shadow Hugging Face's."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    import minilora.kernels

    assert minilora.kernels.__path__ == [str(ROOT / "kernels")]
    assert Path(minilora.kernels.ops.__file__).parent == ROOT / "kernels"


def test_two_process_finetune_from_the_root(tmp_path):
    model, (data, general) = gpt2_model_dir(tmp_path / "model"), instruction_files(tmp_path)
    out = tmp_path / "out"
    result = from_root("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       "-m", "minilora.cli", "finetune", "--model", str(model), "--data", str(data),
                       "--task", "instruction", "--tokenizer", "bytes", "--retain", str(general), "--seq-len", "64",
                       "--steps", "4", "--eval-every", "2", "--batch-size", "2", "--out", str(out), "--no-progressbar")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
