"""The optional native CPU path for NF4 (kernels/nf4_cpu.cpp), compiled on first use.

The torch reference is exact but makes many passes over memory (unpack, gather, scale, cast);
the C++ loop makes one. It is built once per machine with torch's extension loader (needs a C++
compiler and `ninja`; the build is cached) and used only for CPU tensors of at least
`MIN_NUMEL` values, so nobody waits on a compile for a tiny tensor. If it cannot be built, or
MINILORA_NATIVE=0, the torch reference is used: a slower path, never an error.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path
from typing import Optional

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

