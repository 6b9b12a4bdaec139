"""safetensors headers as the pack reads them (`loaders.weights.read_safetensors_header`, on safe_open):
names, dtypes and shapes without reading a tensor, a message for each kind of broken file, and sizes
only for dtypes whose width is known (an unknown one is refused, never guessed)."""

from __future__ import annotations

import importlib
import json
import re
import resource
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


@pytest.fixture
def W(pack):
    return importlib.import_module(f"{pack.__name__}.loaders.weights")


def write_header(path: Path, header: dict, data_bytes: int) -> Path:
    """A safetensors file with this header and `data_bytes` of (sparse, zero) data after it."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + data_bytes)
    return path


def test_names_dtypes_shapes_and_metadata(W, tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.zeros(4, 3), "b": torch.zeros(2, dtype=torch.bfloat16),
               "c": torch.zeros(5, dtype=torch.uint8).view(torch.float8_e4m3fn)}, str(path), metadata={"k": "v"})
    header = W.read_safetensors_header(path)
    assert header.tensors == {"a.weight": ("F32", (4, 3)), "b": ("BF16", (2,)), "c": ("F8_E4M3", (5,))}
    assert header.metadata == {"k": "v"}


def test_fp8_dtype_names_are_the_ones_comfy_files_reads(W, tmp_path):
    """safe_open names torch's fp8 dtypes as comfy_files expects (F8_E4M3 / F8_E5M2 are fp8 weights)."""
    comfy_files = importlib.import_module(W.__name__.rsplit(".", 1)[0] + ".comfy_files")
    names = {}
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu, torch.float8_e4m3fnuz):
        save_file({"t": torch.zeros(4, dtype=torch.uint8).view(dtype)}, str(tmp_path / "t.safetensors"))
        names[dtype] = W.read_safetensors_header(tmp_path / "t.safetensors").tensors["t"][0]
    assert names == {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
                     torch.float8_e8m0fnu: "F8_E8M0", torch.float8_e4m3fnuz: "F8_E4M3FNUZ"}
    assert set(comfy_files._FP8) == {"F8_E4M3", "F8_E5M2"}


def test_every_safetensors_dtype_is_sized_as_safetensors_sizes_it(W, tmp_path):
    """The dtype table holds every dtype this safetensors knows, each with the width safetensors checks the
    data against (a wrong width makes safe_open refuse the file below); a new upstream dtype fails here."""
    probe = write_header(tmp_path / "x.safetensors", {"t": {"dtype": "NOT_A_DTYPE", "shape": [1], "data_offsets": [0, 1]}}, 1)
    with pytest.raises(SafetensorError) as info:
        safe_open(str(probe), framework="pt")
    known = set(re.findall(r"`([A-Z0-9_]+)`", str(info.value).split("expected one of", 1)[1]))
    assert "BF16" in known and known == set(W.DTYPE_BITS)
    for dtype, bits in W.DTYPE_BITS.items():
        path = write_header(tmp_path / f"{dtype}.safetensors", {"t": {"dtype": dtype, "shape": [4, 8],
                                                                     "data_offsets": [0, 32 * bits // 8]}}, 32 * bits // 8)
        assert W.read_safetensors_header(path).tensors["t"] == (dtype, (4, 8))
        assert W.tensor_bytes(path, "t", dtype, (4, 8)) == 32 * bits // 8


def test_an_unknown_dtype_is_refused_not_guessed(W, tmp_path):
    with pytest.raises(W.ModelFolderError, match=r"m\.safetensors stores 'x' as 'F3_NEW', a dtype this pack cannot size"):
        W.tensor_bytes(tmp_path / "m.safetensors", "x", "F3_NEW", (2, 2))
    path = write_header(tmp_path / "odd.safetensors", {"x": {"dtype": "F3_NEW", "shape": [2], "data_offsets": [0, 1]}}, 1)
    with pytest.raises(W.ModelFolderError, match=r"odd\.safetensors stores 'x' as 'F3_NEW', a dtype this pack does "
                                                 r"not know .*download it again"):
        W.read_safetensors_header(path)


@pytest.mark.parametrize("damage, match", [
    ("cut_data", r"is truncated: \d+ bytes on disk, the header describes \d+\. .*download it again"),
    ("extra_bytes", r"is corrupt: \d+ bytes on disk, the header describes \d+\. .*download it again"),
    ("tiny", r"is truncated \(5 bytes\)\. Download it again"),
    ("huge_length", r"is not a valid safetensors file \(header too large\)\. Download it again"),
    ("length_past_end", r"is not a valid safetensors file \(invalid header length\)\. Download it again"),
    ("not_json", r"is not a valid safetensors file \(invalid JSON in header.*\)\. Download it again"),
    ("no_shape", r"has a corrupt safetensors header: the entry 'a' lacks a valid shape, dtype or offsets"),
    ("bad_offsets", r"has a corrupt safetensors header \(.*\)\. Download it again"),
])
def test_broken_files_get_a_message_that_says_what_is_wrong(W, tmp_path, damage, match):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.zeros(8)}, str(path))
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if damage == "cut_data":
        path.write_bytes(data[:-16])
    elif damage == "extra_bytes":
        path.write_bytes(data + b"\0" * 8)
    elif damage == "tiny":
        path.write_bytes(data[:5])
    elif damage == "huge_length":
        path.write_bytes(b"\xff" * 8 + data[8:])
    elif damage == "length_past_end":
        path.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    elif damage == "not_json":
        path.write_bytes(struct.pack("<Q", 16) + b"not json at all!")
    elif damage == "no_shape":
        del header["a"]["shape"]
        write_header(path, header, len(data) - 8 - n)
    else:
        start, end = header["b"]["data_offsets"]
        header["b"]["data_offsets"] = [start - 4, end]  # overlaps a; the file's size is still right
        write_header(path, header, len(data) - 8 - n)
    with pytest.raises(W.ModelFolderError, match=match):
        W.read_safetensors_header(path)


def test_a_20_gb_file_is_read_from_its_header_alone(W, tmp_path):
    """safe_open maps the file and reads the header only: no time or memory that grows with the weights."""
    size = 20 * 2**30
    path = write_header(tmp_path / "big.safetensors", {"__metadata__": {"format": "pt"},
                                                       "w": {"dtype": "BF16", "shape": [size // 2],
                                                             "data_offsets": [0, size]}}, size)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    header = W.read_safetensors_header(path)
    assert time.perf_counter() - start < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 * 1024  # KiB: far below 20 GB
    assert header.tensors == {"w": ("BF16", (size // 2,))} and header.metadata == {"format": "pt"}
    assert W.tensor_bytes(path, "w", "BF16", (size // 2,)) == size
