"""The header of a GGUF model file, read without loading anything.

A GGUF file starts with a header: magic, version, tensor and metadata counts, the
metadata (typed key/value pairs; the tokenizer's whole vocabulary is one of them),
then one entry per tensor (name, shape, type, offset into the data section). The
data section starts at the next multiple of `general.alignment` after the header.

Two questions are answered here, for the registry (context length, a file that
cannot be a model) and for `rkllm-api doctor`:

- `read_header(path)`: the parsed header, with the file size the tensor table implies;
- `problem(path)`: why the file cannot load (None when its header parses, names an
  architecture, lists tensors and the file holds all of them; a LoRA adapter is no
  model either), in words that name no path, so it can go into an API answer.

Every count and length read from the file is bounded before it is used, so a corrupt
or hostile file cannot make the reader allocate or loop without end.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Optional

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)      # version 1 (32-bit counts) is gone from llama.cpp
DEFAULT_ALIGNMENT = 32

# Value types of GGUF metadata, with the struct format of the fixed-size ones.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_KEYS = 100_000
_MAX_TENSORS = 1 << 20
_MAX_DIMS = 8
_MAX_STRING = 1 << 24
_NO_MAGIC = "no GGUF magic"

# (elements per block, bytes per block) of the ggml tensor types, by type id; a type
# not listed is only checked for its offset.
_GGML_TYPES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
    14: (256, 210), 15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98),
    19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82), 23: (256, 136),
    24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56),
    30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17),
}


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF header this reader understands."""


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    architecture: str               # general.architecture ("" when absent)
    file_type: str                  # general.type: "model", "adapter" (LoRA), ... or ""
    context_length: Optional[int]   # <architecture>.context_length, None when absent
    alignment: int
    tensor_count: int
    data_end: int                   # the file size the tensor table implies


def read_header(path: str) -> GGUFHeader:
    """The whole header of the file at path. Raises OSError when it cannot be read and
    GGUFFormatError when it is not a GGUF header."""
    with open(path, "rb") as handle:
        return _read(handle)


def context_length(path: str) -> Optional[int]:
    """`<architecture>.context_length` of a GGUF file, None when the file has none or
    cannot be read."""
    try:
        return read_header(path).context_length
    except (OSError, GGUFFormatError):
        return None


def problem(path: str) -> Optional[str]:
    """Why a GGUF file cannot load: not GGUF, a header that does not parse, a file
    shorter than its header says. None when it looks whole. Names no path."""
    return inspect(path)[1]


def inspect(path: str) -> tuple:
    """(header or None, problem or None) from one read of the file: the header when it
    parses (a truncated file's header still tells its context length), and `problem`'s
    answer."""
    try:
        size = os.path.getsize(path)
        header = read_header(path)
    except OSError as exc:
        return None, f"cannot read the file ({exc.strerror or exc})"
    except GGUFFormatError as exc:
        if str(exc) == _NO_MAGIC:
            return None, "not a GGUF file (no GGUF magic at the start): corrupt or mislabelled"
        return None, f"GGUF header does not parse ({exc}): corrupt or truncated"
    if header.data_end > size:
        return header, (f"truncated: its header describes {header.data_end} bytes, "
                        f"the file has {size} (an unfinished download?)")
    return header, _not_a_model(header)


def _not_a_model(header: GGUFHeader) -> Optional[str]:
    """A whole GGUF file that still is no model llama.cpp could load."""
    if header.file_type == "adapter":
        return "a LoRA adapter, not a model: it goes beside its base model"
    if header.tensor_count == 0:
        return "the GGUF file holds no tensors: not a model"
    if not header.architecture:
        return "the GGUF header names no architecture (general.architecture): not a model"
    return None


# ---------------------------------------------------------------- the reader

def _read(handle: BinaryIO) -> GGUFHeader:
    if handle.read(4) != MAGIC:
        raise GGUFFormatError(_NO_MAGIC)
    version = _unpack(handle, "<I")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFFormatError(f"unsupported GGUF version {version}")
    tensors, keys = _unpack(handle, "<Q"), _unpack(handle, "<Q")
    if tensors > _MAX_TENSORS or keys > _MAX_KEYS:
        raise GGUFFormatError(f"implausible counts ({tensors} tensors, {keys} keys)")
    wanted = _read_metadata(handle, keys)
    architecture = wanted.get("general.architecture")
    architecture = architecture if isinstance(architecture, str) else ""
    file_type = wanted.get("general.type")
    claimed = wanted.get(f"{architecture}.context_length") if architecture else None
    alignment = wanted.get("general.alignment")
    alignment = alignment if isinstance(alignment, int) and alignment > 0 else DEFAULT_ALIGNMENT
    tensor_end = _read_tensor_table(handle, tensors)
    header_end = handle.tell()
    # The data section starts at the next multiple of the alignment; without tensors
    # there is no data and the file may end with its header.
    data_end = -(-header_end // alignment) * alignment + tensor_end if tensors else header_end
    return GGUFHeader(
        version=version, architecture=architecture,
        file_type=file_type if isinstance(file_type, str) else "",
        context_length=int(claimed) if isinstance(claimed, int) and claimed > 0 else None,
        alignment=alignment, tensor_count=tensors, data_end=data_end)


def _read_metadata(handle: BinaryIO, keys: int) -> dict:
    """The few metadata values this module uses; every other value is skipped."""
    found = {}
    for _ in range(keys):
        key = _read_string(handle)
        value_type = _unpack(handle, "<I")
        if key in ("general.architecture", "general.alignment", "general.type") or \
                key.endswith(".context_length"):
            found[key] = _read_value(handle, value_type)
        else:
            _skip_value(handle, value_type)
    return found


def _read_tensor_table(handle: BinaryIO, tensors: int) -> int:
    """The end of the furthest tensor, relative to the start of the data section."""
    end = 0
    for _ in range(tensors):
        _read_string(handle)                       # tensor name
        dims = _unpack(handle, "<I")
        if dims > _MAX_DIMS:
            raise GGUFFormatError(f"implausible tensor rank {dims}")
        elements = 1
        for _ in range(dims):
            elements *= _unpack(handle, "<Q")
        kind, offset = _unpack(handle, "<I"), _unpack(handle, "<Q")
        block, block_bytes = _GGML_TYPES.get(kind, (1, 0))
        end = max(end, offset + -(-elements // block) * block_bytes)
    return end


def _unpack(handle: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = handle.read(size)
    if len(data) != size:
        raise GGUFFormatError("truncated header")
    return struct.unpack(fmt, data)[0]


def _read_string(handle: BinaryIO) -> str:
    length = _unpack(handle, "<Q")
    if length > _MAX_STRING:
        raise GGUFFormatError(f"implausible string length {length}")
    data = handle.read(length)
    if len(data) != length:
        raise GGUFFormatError("truncated string")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise GGUFFormatError("a string is not UTF-8") from None


def _read_value(handle: BinaryIO, value_type: int):
    if value_type in _SCALARS:
        return _unpack(handle, _SCALARS[value_type])
    if value_type == _STRING:
        return _read_string(handle)
    _skip_value(handle, value_type)
    return None


def _skip_value(handle: BinaryIO, value_type: int) -> None:
    if value_type in _SCALARS:
        _skip(handle, struct.calcsize(_SCALARS[value_type]))
    elif value_type == _STRING:
        length = _unpack(handle, "<Q")
        if length > _MAX_STRING:
            raise GGUFFormatError(f"implausible string length {length}")
        _skip(handle, length)
    elif value_type == _ARRAY:
        item_type = _unpack(handle, "<I")
        count = _unpack(handle, "<Q")
        if item_type in _SCALARS:
            _skip(handle, count * struct.calcsize(_SCALARS[item_type]))
        else:
            for _ in range(count):
                _skip_value(handle, item_type)
    else:
        raise GGUFFormatError(f"unknown metadata type {value_type}")


def _skip(handle: BinaryIO, size: int) -> None:
    """Seek forward; a seek past the end is only noticed by the next read, which then
    comes back short and raises."""
    handle.seek(size, os.SEEK_CUR)
