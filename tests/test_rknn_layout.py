"""librknnrt struct layouts: the ctypes declarations, the C double and the documented
figures agree.

Three sources must give the same sizes and offsets: rknn_ctypes' declarations, the
double's own sizeof/offsetof (gcc compiling its independent C declarations, reported
through fake_rknn_layout) and the figures below, measured on the public rknpu2 header
(LP64: x86_64 and aarch64 lay these structs out identically).
"""
from __future__ import annotations

import ctypes
import json

import pytest

import rknn_ctypes as rn

# Documented figures: {struct: (size, {field: offset})}.
DOCUMENTED = {
    "rknn_input_output_num": (8, {"n_input": 0, "n_output": 4}),
    # dims holds 16 uint32 (8..72), name 256 chars (72..328); fl is one byte followed
    # by 3 bytes of padding before zp; pass_through one byte before h_stride.
    "rknn_tensor_attr": (376, {"index": 0, "n_dims": 4, "dims": 8, "name": 72,
                               "n_elems": 328, "size": 332, "fmt": 336, "type": 340,
                               "qnt_type": 344, "fl": 348, "zp": 352, "scale": 356,
                               "w_stride": 360, "size_with_stride": 364,
                               "pass_through": 368, "h_stride": 372}),
    "rknn_input": (32, {"index": 0, "buf": 8, "size": 16, "pass_through": 20, "type": 24,
                        "fmt": 28}),
    "rknn_output": (24, {"want_float": 0, "is_prealloc": 1, "index": 4, "buf": 8,
                         "size": 16}),
}
CTYPES_CLASSES = {
    "rknn_input_output_num": rn.RknnInputOutputNum,
    "rknn_tensor_attr": rn.RknnTensorAttr,
    "rknn_input": rn.RknnInput,
    "rknn_output": rn.RknnOutput,
}
# Enum values the binding passes or reads, from the same notes.
DOCUMENTED_ENUMS = {
    rn.RknnQueryCmd: {"IN_OUT_NUM": 0, "INPUT_ATTR": 1, "OUTPUT_ATTR": 2},
    rn.RknnTensorFormat: {"NCHW": 0, "NHWC": 1, "NC1HWC2": 2},
    rn.RknnTensorType: {"FLOAT32": 0, "FLOAT16": 1, "INT8": 2, "UINT8": 3},
    rn.RknnCoreMask: {"AUTO": 0, "CORE_0": 1, "CORE_1": 2, "CORE_2": 4, "CORE_0_1": 3,
                      "CORE_0_1_2": 7},
}


@pytest.fixture(scope="module")
def double_layout(rknn_double_lib) -> dict:
    library = ctypes.CDLL(rknn_double_lib)
    library.fake_rknn_layout.argtypes = [ctypes.c_char_p, ctypes.c_int]
    library.fake_rknn_layout.restype = ctypes.c_int
    needed = library.fake_rknn_layout(None, 0)
    buffer = ctypes.create_string_buffer(needed + 1)
    assert library.fake_rknn_layout(buffer, len(buffer)) == needed
    report = json.loads(buffer.value.decode())
    assert report["library"] == "fake-rknnrt"
    return report["structs"]


def test_ctypes_declarations_match_the_documented_figures():
    for name, (size, offsets) in DOCUMENTED.items():
        struct = CTYPES_CLASSES[name]
        assert ctypes.sizeof(struct) == size, name
        assert {field for field, _ in struct._fields_} == set(offsets), name
        for field, offset in offsets.items():
            assert getattr(struct, field).offset == offset, f"{name}.{field}"


def test_ctypes_declarations_match_the_compiled_double(double_layout):
    assert set(double_layout) == set(CTYPES_CLASSES)
    for name, layout in double_layout.items():
        struct = CTYPES_CLASSES[name]
        assert ctypes.sizeof(struct) == layout["size"], name
        assert {field for field, _ in struct._fields_} == set(layout["offsets"]), name
        for field, offset in layout["offsets"].items():
            assert getattr(struct, field).offset == offset, f"{name}.{field}"


def test_the_double_matches_the_documented_figures(double_layout):
    for name, (size, offsets) in DOCUMENTED.items():
        assert double_layout[name] == {"size": size, "offsets": offsets}, name


def test_array_fields_have_the_documented_lengths():
    attr = rn.RknnTensorAttr()
    assert len(attr.dims) == 16
    assert rn.RknnTensorAttr.name.size == 256
    assert ctypes.sizeof(rn.rknn_context) == 8  # a uint64 id, also on 32-bit userlands


def test_enum_values_match_the_documented_ones():
    for enum_class, values in DOCUMENTED_ENUMS.items():
        assert {member.name: member.value for member in enum_class} == values
