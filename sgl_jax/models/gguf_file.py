"""A GGUF file's metadata and tensor directory, read in one pass (host code, numpy only).

gguf-py's `GGUFReader` makes a numpy view for every part of every field: for a tokenizer of 49k tokens and
49k merges that is ~300k views and 8 s of a server's start (read twice: weights and tokenizer). This
reader parses the same layout with `struct` over one memory map: metadata values become plain Python
values (numeric arrays become numpy arrays), and each tensor's payload is a zero-copy uint8 view of the
map, which `gguf_quants.dequantize` takes as it is.

Layout (GGUF v2/v3, little-endian): magic "GGUF", version u32, tensor count u64, metadata count u64; the
metadata (key string, value type u32, value); the tensor infos (name string, n_dims u32, dims u64 x n_dims
in ggml order -- fastest-varying first --, type u32, offset u64); padding to `general.alignment` (32 by
default); the tensor data, each tensor at its offset from there. A string is a u64 length and UTF-8 bytes.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import struct

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# value type -> (struct format, numpy dtype) for the scalar types; 8 = string, 9 = array
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
            10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF file this reader understands (the message names the offset)."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 first), as gguf-py reports it
    tensor_type: int  # a GGMLQuantizationType value
    data: np.ndarray  # uint8 view of the payload (no copy)


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFFormatError(f"truncated at byte {self.pos} (needed {size} more bytes)")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFFormatError(f"truncated string of {n} bytes at byte {self.pos}")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.take("<I"), self.take("<Q")
            if etype in _SCALARS:
                dt = np.dtype(_SCALARS[etype][1]).newbyteorder("<")
                end = self.pos + n * dt.itemsize
                if end > len(self.buf):
                    raise GGUFFormatError(f"truncated array of {n} values at byte {self.pos}")
                arr = np.frombuffer(self.buf, dt, n, self.pos).copy()
                self.pos = end
                return arr
            return [self.value(etype) for _ in range(n)]
        raise GGUFFormatError(f"unknown metadata value type {vtype} at byte {self.pos}")


class GGUFFile:
    """`fields`: metadata key -> value; `tensors`: TensorInfo in file order. The memory map stays open
    while any tensor view is alive."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as e:  # an empty file cannot be mapped
                raise GGUFFormatError(f"cannot map the file ({e})") from None
        buf = memoryview(self._map)
        c = _Cursor(buf)
        if len(buf) < 4 or bytes(buf[:4]) != b"GGUF":
            raise GGUFFormatError("no GGUF magic at the start of the file")
        c.pos = 4
        version = c.take("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} (this reader knows 2 and 3)")
        n_tensors, n_kv = c.take("<Q"), c.take("<Q")
        self.fields: dict = {}
        for _ in range(n_kv):
            key = c.string()
            self.fields[key] = c.value(c.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            dims = tuple(c.take("<Q") for _ in range(c.take("<I")))
            infos.append((name, dims, c.take("<I"), c.take("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-c.pos // align) * align
        data = np.frombuffer(self._map, np.uint8)
        self.tensors = []
        for name, dims, ttype, off in infos:
            try:  # sizes of every type ggml knows; whether it can be dequantized is gguf_quants' business
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (KeyError, ValueError):
                raise GGUFFormatError(f"tensor {name!r} has an unknown GGML type {ttype}") from None
            nbytes = math.prod(dims) // block * size
            a = start + off
            if a + nbytes > len(data):
                raise GGUFFormatError(f"tensor {name!r} ends past the end of the file (truncated?)")
            self.tensors.append(TensorInfo(name, dims, ttype, data[a:a + nbytes]))
