"""minilora.kernels: Triton GPU kernels, one file per kernel, each with its torch reference.

This folder sits at the top of the repository but installs as `minilora.kernels` (see
pyproject.toml's package-dir): a top-level module named `kernels` would shadow Hugging Face's
unrelated `kernels` package, which transformers and bitsandbytes import.
"""
