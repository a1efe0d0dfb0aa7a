"""The GGUF header reader (rkllm_api/models/gguf.py) on hand-built headers, cut and
corrupted ones, and the real SmolLM2 file."""
from __future__ import annotations

import os
import struct

import pytest

from rkllm_api.models import gguf


def text(value: str) -> bytes:
    data = value.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_file(*, tensors=((4, 0),), context_length=2048, version=3, alignment=None,
              data: bytes = None, extra_keys=()) -> bytes:
    """A GGUF header (architecture llama, its context length, optional alignment, extra
    string keys) with F32 tensors given as (elements, offset), then the data section."""
    keys = [text("general.architecture") + struct.pack("<I", 8) + text("llama"),
            # an array before the key we want: the reader must skip it correctly
            text("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + text("a") + text("b"),
            text("llama.context_length") + struct.pack("<II", 4, context_length)]
    keys += [text(key) + struct.pack("<I", 8) + text(value) for key, value in extra_keys]
    if alignment:
        keys.append(text("general.alignment") + struct.pack("<II", 4, alignment))
    header = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(keys)) + b"".join(keys)
    for number, (elements, offset) in enumerate(tensors):
        header += text(f"t{number}") + struct.pack("<IQ", 1, elements) + struct.pack("<IQ", 0, offset)
    if not tensors:
        return header
    align = alignment or 32
    header = header.ljust(-(-len(header) // align) * align, b"\0")
    size = max(offset + 4 * elements for elements, offset in tensors)
    return header + (data if data is not None else b"\0" * size)


def write(tmp_path, name, content) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def test_a_whole_file_reads_and_passes(tmp_path):
    path = write(tmp_path, "ok.gguf", gguf_file(tensors=((4, 0), (8, 64))))
    header = gguf.read_header(path)
    assert (header.version, header.architecture, header.context_length) == (3, "llama", 2048)
    assert header.tensor_count == 2 and header.data_end == len(open(path, "rb").read())
    assert gguf.problem(path) is None and gguf.context_length(path) == 2048


def test_alignment_from_the_metadata_places_the_data(tmp_path):
    content = gguf_file(alignment=64)
    path = write(tmp_path, "aligned.gguf", content)
    assert gguf.read_header(path).alignment == 64
    assert gguf.problem(path) is None
    assert "truncated" in gguf.problem(write(tmp_path, "cut.gguf", content[:-1]))


def test_whole_files_that_are_no_model(tmp_path):
    no_tensors = write(tmp_path, "vocab.gguf", gguf_file(tensors=()))
    header, problem = gguf.inspect(no_tensors)
    assert header.data_end == len(gguf_file(tensors=())) and "holds no tensors" in problem
    nameless = gguf_file().replace(b"general.architecture", b"general.xrchitecture")
    assert "names no architecture" in gguf.problem(write(tmp_path, "anon.gguf", nameless))
    adapter = gguf_file(extra_keys=[("general.type", "adapter")])
    assert "LoRA adapter" in gguf.problem(write(tmp_path, "lora.gguf", adapter))


def test_a_truncated_file_keeps_its_header_and_says_how_short(tmp_path):
    content = gguf_file()
    path = write(tmp_path, "cut.gguf", content[:-6])
    header, problem = gguf.inspect(path)
    assert header.context_length == 2048
    assert problem.startswith("truncated") and f"{len(content)} bytes" in problem
    assert str(tmp_path) not in problem      # problems go to clients: no paths


@pytest.mark.parametrize("content,words", [
    (b"GGML" + gguf_file()[4:], "no GGUF magic"),
    (b"", "no GGUF magic"),
    (gguf_file()[:30], "does not parse"),
    (gguf_file(version=1), "unsupported GGUF version 1"),
    (b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0), "implausible counts"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 40), "implausible string"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + text("k") + struct.pack("<I", 77), "unknown metadata type"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2) + b"\xff\xfe", "not UTF-8"),
])
def test_corrupt_headers_are_named_not_raised(tmp_path, content, words):
    path = write(tmp_path, "bad.gguf", content)
    problem = gguf.problem(path)
    assert words in problem and str(tmp_path) not in problem
    assert gguf.context_length(path) is None
    with pytest.raises(gguf.GGUFFormatError):
        gguf.read_header(path)


def test_an_unreadable_file_is_a_problem_too(tmp_path):
    assert "cannot read" in gguf.problem(str(tmp_path / "missing.gguf"))


def test_the_bundled_model_passes():
    """The real SmolLM2 file (quantized tensor types) fills exactly what its header lists."""
    from rkllm_api.models.registry import bundled_model_file
    path = bundled_model_file()
    if not path:
        pytest.skip("the bundled model is not installed (./setup.sh installs it)")
    header, problem = gguf.inspect(path)
    assert problem is None and header.architecture == "llama" and header.context_length == 8192
    assert header.data_end == os.path.getsize(path)   # exactly: no slack, no shortfall
