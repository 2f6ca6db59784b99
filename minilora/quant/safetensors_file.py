"""Reading a safetensors file one tensor at a time, after checking it as strictly as the
safetensors library does. A model file is input from outside: a header that lies about sizes or
offsets is refused, with the file and the tensor named, before anything is allocated.

The format: 8 bytes of little-endian header length N, N bytes of JSON mapping each tensor's name
to {"dtype", "shape", "data_offsets": [begin, end]} (plus an optional "__metadata__" of strings),
then the data. The tensors' byte ranges, sorted, must tile the data exactly: the first begins at
0, each begins where the previous ends, the last ends at the end of the file, and each holds
prod(shape) × itemsize bytes. After these checks the file is opened with the library itself as a
last guard, so nothing it would refuse is read here.

Reading with readinto into one reused buffer (rather than mapping the file) keeps the file's
pages out of this process: only the tensor being read is resident.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on the JSON header
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class SafetensorsFileError(ValueError):
    """A safetensors file that cannot be read as it claims to be."""


def read_header(path: Path) -> tuple[int, list[tuple[str, torch.dtype, list[int], int, int]]]:
    """(start of the data, [(name, dtype, shape, begin, end)] sorted by begin), every claim checked."""
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsFileError(f"{path} is not a safetensors file: it has {len(prefix)} bytes, fewer than "
                                       "the 8 of its header length")
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER_BYTES or 8 + n > file_size:
            raise SafetensorsFileError(f"{path} is damaged: its header claims {n} bytes, but the file has {file_size} "
                                       f"(and a header may hold at most {MAX_HEADER_BYTES})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SafetensorsFileError(f"{path} is not a safetensors file (bad header: {err})") from None
    if not isinstance(header, dict):
        raise SafetensorsFileError(f"{path}: the header is a JSON {type(header).__name__}, not an object of tensors")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsFileError(f"{path}: __metadata__ must map names to strings")
    entries = sorted((_entry(path, name, info) for name, info in header.items()), key=lambda e: (e[3], e[4]))
    data_size, cursor = file_size - 8 - n, 0
    for name, _, _, begin, end in entries:
        if begin != cursor:
            what = "overlaps the tensor before it" if begin < cursor else f"leaves a gap of {begin - cursor} bytes before it"
            raise SafetensorsFileError(f"{path}: tensor {name!r} starts at byte {begin}, which {what}")
        cursor = end
    if cursor != data_size:
        raise SafetensorsFileError(f"{path}: the tensors cover {cursor} bytes of data but the file holds {data_size}; "
                                   "it is truncated or has bytes no tensor claims")
    return 8 + n, entries


def _entry(path: Path, name: str, info) -> tuple[str, torch.dtype, list[int], int, int]:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsFileError(f"{where} must have exactly dtype, shape and data_offsets, got {info!r:.100}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPES:
        raise SafetensorsFileError(f"{where} has dtype {dtype!r}, which minilora does not read ({', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise SafetensorsFileError(f"{where} has shape {shape!r:.100}: expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise SafetensorsFileError(f"{where} has data_offsets {offsets!r:.100}: expected [begin, end] with "
                                   "0 <= begin <= end")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if nbytes != end - begin:
        raise SafetensorsFileError(f"{where}: shape {shape} of {dtype} needs {nbytes} bytes, but its data_offsets "
                                   f"hold {end - begin}")
    return name, DTYPES[dtype], shape, begin, end


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a checked safetensors file, one at a time, in file order, through one
    reused buffer: each tensor is valid until the next is read (copy what you keep)."""
    path = Path(path)
    start, entries = read_header(path)
    try:
        with safe_open(path, framework="pt"):  # the library's own checks: header only, no data is read
            pass
    except SafetensorError as err:
        raise SafetensorsFileError(f"{path} is refused by the safetensors library: {err}") from None
    buffer = torch.empty(max((end - begin for *_, begin, end in entries), default=0), dtype=torch.uint8)
    with open(path, "rb") as f:
        for name, dtype, shape, begin, end in entries:
            raw = buffer[: end - begin]
            f.seek(start + begin)
            if f.readinto(memoryview(raw.numpy())) != end - begin:
                raise SafetensorsFileError(f"{path} changed while it was read: tensor {name!r} is incomplete")
            yield name, raw.view(dtype).view(shape)
