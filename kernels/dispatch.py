"""Choosing between a kernel's Triton implementation and its torch reference.

    backend="auto"    Triton for CUDA tensors when a Triton kernel is available, else the reference
    backend="torch"   always the reference
    backend="triton"  always the kernel (with TRITON_INTERPRET=1 it runs on CPU tensors, for tests)

A missing Triton or GPU is never an error under "auto": only a slower path.
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "torch", "triton")
TRITON_KERNELS: dict[str, object] = {}  # kernel name -> Triton implementation, registered by kernel files


def pick(name: str, backend: str, tensor: torch.Tensor) -> str:
    """"torch" or "triton" for kernel `name` on `tensor`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if name not in TRITON_KERNELS:
            raise RuntimeError(
                f"no Triton implementation of {name} is available (is triton installed?); "
                "use backend='auto' or backend='torch'"
            )
        return "triton"
    if backend == "auto" and tensor.is_cuda and name in TRITON_KERNELS:
        return "triton"
    return "torch"
