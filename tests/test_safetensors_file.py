"""load_quantized's safetensors reader against malformed files: each is refused with an error that
names the file (and the tensor, where one is at fault), never a huge allocation, never wrong data.
The safetensors library is the oracle: whatever it refuses, the reader refuses too, and whatever
the reader accepts reads as the library reads it."""

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minilora.quant.safetensors_file import SafetensorsFileError, read_safetensors

TENSORS = {"a": torch.arange(15, dtype=torch.float32).view(3, 5), "b": torch.arange(7), "c": torch.ones(4, dtype=torch.bfloat16)}


def valid_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(TENSORS, path)
    return path


def split(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write(path, header, data, claimed_length=None):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if claimed_length is None else claimed_length) + text + data)
    return path


def library_refuses(path) -> bool:
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
        return False
    except Exception:  # noqa: BLE001 - any refusal by the library counts
        return True


def read_all(path):
    return {name: t.clone() for name, t in read_safetensors(path)}


def mutated(header, name, **changes):
    header = json.loads(json.dumps(header))
    header[name].update(changes)
    return header


def overlapped(header):
    """The last tensor moved 4 bytes back, into the one before it."""
    last = max(header, key=lambda name: header[name]["data_offsets"][0])
    begin, end = header[last]["data_offsets"]
    return mutated(header, last, data_offsets=[begin - 4, end - 4])


CASES = {  # (what the header says, what the error must say)
    "negative offsets": (lambda h: mutated(h, "a", data_offsets=[-8, 52]), "'a' has data_offsets"),
    "overlapping tensors": (lambda h: overlapped(h), "starts at byte .* overlaps the tensor before it"),
    "offsets of 10^13": (lambda h: mutated(h, "c", data_offsets=[h["c"]["data_offsets"][0], 10**13]), "'c'"),
    "shape that does not fit its bytes": (lambda h: mutated(h, "a", shape=[4, 5]), "'a': shape \\[4, 5\\] of F32 needs 80 bytes"),
    "unknown dtype": (lambda h: mutated(h, "b", dtype="Q7"), "'b' has dtype 'Q7'"),
    "negative shape": (lambda h: mutated(h, "a", shape=[-3, -5]), "'a' has shape"),
    "missing field": (lambda h: {**h, "a": {"dtype": "F32", "shape": [3, 5]}}, "'a' must have exactly"),
    "header not an object": (lambda h: [1, 2, 3], "not an object"),
}


@pytest.mark.parametrize("case", CASES)
def test_each_malformed_header_is_refused_by_both(tmp_path, case):
    header, data = split(valid_file(tmp_path))
    change, message = CASES[case]
    path = write(tmp_path / "bad.safetensors", change(header), data)
    assert library_refuses(path), "the oracle accepts this file: the case is not malformed"
    with pytest.raises(SafetensorsFileError, match=message) as err:
        read_all(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("claimed", [2**40, 2**63, 10**8 + 1])
def test_a_huge_header_length_is_refused_before_any_allocation(tmp_path, claimed):
    header, data = split(valid_file(tmp_path))
    path = write(tmp_path / "bad.safetensors", header, data, claimed_length=claimed)
    assert library_refuses(path)
    with pytest.raises(SafetensorsFileError, match="header claims"):
        read_all(path)


def test_truncated_and_tiny_files(tmp_path):
    raw = valid_file(tmp_path).read_bytes()
    for size in (0, 5, len(raw) - 3):
        path = tmp_path / f"cut{size}.safetensors"
        path.write_bytes(raw[:size])
        assert library_refuses(path)
        with pytest.raises(SafetensorsFileError, match=str(path)):
            read_all(path)


@settings(max_examples=150, deadline=None)
@given(position=st.integers(0, 400), value=st.integers(0, 255), cut=st.integers(0, 4))
def test_any_damaged_file_is_refused_or_read_exactly_as_the_library_reads_it(tmp_path_factory, position, value, cut):
    """One byte of the header region changed (and possibly the end cut): either both readers
    accept and agree tensor for tensor, or the reader refuses with its own error."""
    tmp = tmp_path_factory.mktemp("fuzz")
    raw = bytearray(valid_file(tmp).read_bytes())
    raw[min(position, len(raw) - 1)] = value
    path = tmp / "damaged.safetensors"
    path.write_bytes(bytes(raw[: len(raw) - cut]))
    try:
        ours = read_all(path)
    except SafetensorsFileError:
        return
    assert not library_refuses(path)
    theirs = load_file(path)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name


def test_a_valid_file_reads_as_the_library_reads_it(tmp_path):
    path = valid_file(tmp_path)
    ours, theirs = read_all(path), load_file(path)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
