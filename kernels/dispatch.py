"""Choosing between a kernel's Triton implementation and its torch reference.

    backend="auto"    Triton for CUDA tensors when a Triton kernel is available, else the reference
    backend="torch"   always the reference
    backend="triton"  always the kernel (with TRITON_INTERPRET=1 it runs on CPU tensors, for tests)

A missing Triton or GPU is never an error under "auto": only a slower path.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

try:
    import triton
except ImportError:  # the Triton kernels are optional: without them every call takes the reference
    triton = None

BACKENDS = ("auto", "torch", "triton")
TRITON_KERNELS: dict[str, object] = {}  # kernel name -> Triton implementation, registered by kernel files


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_launch_options() -> dict:
    """No fused multiply-add on the GPU: a × b + c rounds twice, as the torch reference does, so
    results are bit-exact. (The interpreter runs NumPy and takes no launch options.)"""
    return {} if interpreting() else {"enable_fp_fusion": False}


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
        if not tensor.is_cuda and not interpreting():
            raise RuntimeError(f"the Triton {name} kernel runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1)")
        return "triton"
    if backend == "auto" and tensor.is_cuda and name in TRITON_KERNELS:
        return "triton"
    return "torch"


def implementation(name: str, backend: str, tensor: torch.Tensor, reference: Callable) -> Callable:
    """The function that computes kernel `name` on `tensor`: its Triton kernel or `reference`."""
    return TRITON_KERNELS[name] if pick(name, backend, tensor) == "triton" else reference
