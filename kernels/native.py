"""The optional native CPU path for NF4 (kernels/nf4_cpu.cpp), compiled on first use.

The torch reference is exact but makes many passes over memory (unpack, gather, scale, cast);
the C++ loop makes one. It is built once per machine with torch's extension loader (needs a C++
compiler and `ninja`; the build is cached) and used only for CPU tensors of at least
`MIN_NUMEL` values, so nobody waits on a compile for a tiny tensor. If it cannot be built, or
MINILORA_NATIVE=0, the torch reference is used: a slower path, never an error. Each compiled
function checks its arguments' devices, dtypes and lengths (TORCH_CHECK, a RuntimeError) before
its loop reads anything.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path
from typing import Optional

import torch

from minilora.quant.nf4_format import (
    DYNAMIC_MAP, NF4_BOUNDS, NF4_LEVELS, SCALE_BLOCK, NF4State, pack_reference, unpack_reference,
)

MIN_NUMEL = 1 << 16
_module = None
_failed = False


def _build_tag(source: Path) -> str:
    """The build is tuned to this CPU (-march=native): name it by CPU, source text and source path,
    so a cache shared between machines, versions or checkouts never loads (or keeps rebuilding
    over) a build made for another."""
    cpu = platform.machine() + platform.processor()
    try:
        cpu += next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return hashlib.sha256(cpu.encode() + str(source.resolve()).encode() + source.read_bytes()).hexdigest()[:12]


def native_module() -> Optional[object]:
    """The compiled extension, or None when it is disabled or cannot be built."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    if os.environ.get("MINILORA_NATIVE", "1") == "0":
        _failed = True
        return None
    try:
        from torch.utils.cpp_extension import load

        source = Path(__file__).with_name("nf4_cpu.cpp")
        _module = load(name=f"minilora_nf4_cpu_{_build_tag(source)}", sources=[str(source)],
                       extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # noqa: BLE001 - any build failure means: use the torch path
        _failed = True
        warnings.warn(f"minilora's native NF4 CPU path could not be built ({type(err).__name__}: {err}); "
                      "using the torch reference (slower, same results)", stacklevel=2)
    return _module



def choose(tensor: torch.Tensor, numel: int, native: Optional[bool]):
    """The compiled module when it should be used for `numel` values, else None (then the torch
    reference runs). native=None: only for large CPU tensors, and only if it builds; True: always
    (an error if it cannot); False: never."""
    if native is False:
        return None
    if native is None:
        return native_module() if tensor.device.type == "cpu" and numel >= MIN_NUMEL else None
    if tensor.device.type != "cpu" or native_module() is None:
        raise RuntimeError("the native NF4 path needs CPU tensors, a C++ compiler and ninja")
    return native_module()


def pack(flat: torch.Tensor, blocksize: int, native: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) float -> (packed uint8 [(n+1)//2], absmax fp32 [n_blocks]), natively or by the reference.
    A NaN or inf anywhere is an error: it would poison its block's scale."""
    module = choose(flat, flat.numel(), native)
    if module is not None:
        packed, absmax, finite = module.nf4_pack(flat.contiguous(), NF4_BOUNDS, blocksize)
    else:
        finite = torch.isfinite(flat).all()
        packed, absmax = pack_reference(flat.float(), blocksize) if finite else (None, None)
    if not finite:
        raise ValueError(f"the weight holds NaN or inf ({(~torch.isfinite(flat)).sum().item()} values): fix it before quantizing")
    return packed, absmax


def dequantize(packed: torch.Tensor, state: NF4State, dtype: torch.dtype, native: Optional[bool] = None) -> torch.Tensor:
    """(packed, state) -> W_hat of state.shape in `dtype`, natively or by the reference; the caller
    has checked the state (nf4_format.check_state). The native functions check again every length
    they index (packed ≥ (n+1)//2 bytes, ≥ n_blocks scales, ≥ n_blocks2 absmax2 values, 16 levels,
    256 map entries, one offset), so a state that skipped the check is a RuntimeError, never a read
    out of bounds."""
    module = choose(packed, state.numel, native)
    if module is None:
        return unpack_reference(packed, state, dtype)
    scales = (module.dq_scales(state.absmax, state.absmax2, state.offset, DYNAMIC_MAP, SCALE_BLOCK) if state.double_quant
              else state.absmax)
    flat = module.nf4_unpack(packed.reshape(-1).contiguous(), scales, NF4_LEVELS, state.numel, state.blocksize, dtype)
    return flat.view(state.shape)
