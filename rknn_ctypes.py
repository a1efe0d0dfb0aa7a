"""librknnrt (the Rockchip NPU runtime for .rknn models) through ctypes: the part a
vision encoder needs.

A vision-language model on the NPU is two models: the language model (.rkllm, run by
librkllmrt, see rkllm_ctypes.py) and its image encoder (.rknn, run by librknnrt).
This module loads the encoder, tells what image it expects (size, layout, dtype) and
turns a preprocessed image into the embedding rows the language model takes.

Layout of the module:
  1. enums and structs (from the project's ABI notes, 64-bit)
  2. the C functions: one declaration per function, its prototype in a comment,
     argtypes/restype set once, a typed Python wrapper that raises on failure
  3. finding the library
  4. RknnEncoder: one .rknn model loaded, with `input_spec` and `encode()`
"""
from __future__ import annotations

import ctypes
import ctypes.util
import enum
import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import rkllm_ctypes
from rkllm_ctypes import c_function
from rkllm_api.runtimes.base import RuntimeLoadError

if TYPE_CHECKING:
    import numpy

log = logging.getLogger(__name__)

# =============================================================== 1. types

RKNN_MAX_DIMS = 16
RKNN_MAX_NAME_LEN = 256

# typedef uint64_t rknn_context;  (an opaque id, not a pointer, on 64-bit builds)
rknn_context = ctypes.c_uint64


class RknnQueryCmd(enum.IntEnum):
    IN_OUT_NUM = 0
    INPUT_ATTR = 1
    OUTPUT_ATTR = 2


class RknnTensorFormat(enum.IntEnum):
    NCHW = 0
    NHWC = 1
    NC1HWC2 = 2  # the NPU's native blocked layout; an encoder's image input never uses it


class RknnTensorType(enum.IntEnum):
    # Only the types the ABI notes name; others are refused rather than guessed.
    FLOAT32 = 0
    FLOAT16 = 1
    INT8 = 2
    UINT8 = 3


class RknnCoreMask(enum.IntEnum):
    """Which NPU cores run the model. RK3588 has three, RK3576 two; RK356x has one
    and rejects any mask call."""
    AUTO = 0
    CORE_0 = 1
    CORE_1 = 2
    CORE_2 = 4
    CORE_0_1 = 3
    CORE_0_1_2 = 7


class RknnInputOutputNum(ctypes.Structure):
    _fields_ = [("n_input", ctypes.c_uint32), ("n_output", ctypes.c_uint32)]


class RknnTensorAttr(ctypes.Structure):
    _fields_ = [
        ("index", ctypes.c_uint32),          # set by the caller before rknn_query
        ("n_dims", ctypes.c_uint32),
        ("dims", ctypes.c_uint32 * RKNN_MAX_DIMS),
        ("name", ctypes.c_char * RKNN_MAX_NAME_LEN),
        ("n_elems", ctypes.c_uint32),
        ("size", ctypes.c_uint32),           # bytes in the model's own type
        ("fmt", ctypes.c_int),               # RknnTensorFormat
        ("type", ctypes.c_int),              # RknnTensorType
        ("qnt_type", ctypes.c_int),
        ("fl", ctypes.c_int8),
        ("zp", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("w_stride", ctypes.c_uint32),
        ("size_with_stride", ctypes.c_uint32),
        ("pass_through", ctypes.c_uint8),
        ("h_stride", ctypes.c_uint32),
    ]

    def shape(self) -> tuple:
        return tuple(int(d) for d in self.dims[:self.n_dims])


class RknnInput(ctypes.Structure):
    _fields_ = [
        ("index", ctypes.c_uint32),
        ("buf", ctypes.c_void_p),
        ("size", ctypes.c_uint32),
        ("pass_through", ctypes.c_uint8),  # 0: the runtime converts type/layout to the model's
        ("type", ctypes.c_int),            # RknnTensorType of buf
        ("fmt", ctypes.c_int),             # RknnTensorFormat of buf
    ]


class RknnOutput(ctypes.Structure):
    _fields_ = [
        ("want_float", ctypes.c_uint8),   # 1: the runtime dequantises to float32
        ("is_prealloc", ctypes.c_uint8),  # 0: the runtime allocates buf (freed by release)
        ("index", ctypes.c_uint32),
        ("buf", ctypes.c_void_p),
        ("size", ctypes.c_uint32),
    ]


# ==================================================== 2. the C functions


class RknnError(RuntimeError):
    """A librknnrt call returned a failure code."""

    def __init__(self, function: str, code: Optional[int], detail: str = ""):
        self.function = function
        self.code = code  # None: the call succeeded but what it returned is unusable
        if code is None:
            message = f"{function} returned an unusable result"
        else:
            meaning = " (generic failure)" if code == -1 else ""
            message = f"{function} failed with code {code}{meaning}"
        super().__init__(message + (f": {detail}" if detail else ""))


class RknnLoadError(RuntimeLoadError):
    """librknnrt or the .rknn model could not be found or loaded."""


def _checked(function: str, status: int, detail: str = "") -> None:
    if status != 0:
        raise RknnError(function, status, detail)


class Librknnrt:
    """librknnrt's functions, bound once; every wrapper raises RknnError on a
    non-zero return."""

    def __init__(self, cdll: ctypes.CDLL, path: str):
        self.path = path
        self._c = cdll
        for declaration in self._declarations():
            try:
                function = getattr(cdll, declaration.name)
            except AttributeError:
                raise RknnLoadError(f"{path} does not export {declaration.name}: "
                                    "is it really librknnrt?") from None
            function.argtypes = list(declaration.argtypes)
            function.restype = declaration.restype

    @classmethod
    def _declarations(cls) -> list:
        return [value.c_declaration for value in vars(cls).values()
                if hasattr(value, "c_declaration")]

    # int rknn_init(rknn_context* context, void* model, uint32_t size, uint32_t flag,
    #               rknn_init_extend* extend);      (size 0: model is a file path)
    @c_function("rknn_init", [ctypes.POINTER(rknn_context), ctypes.c_void_p, ctypes.c_uint32,
                               ctypes.c_uint32, ctypes.c_void_p], ctypes.c_int)
    def rknn_init(self, context, model: bytes, flag: int = 0) -> None:
        _checked("rknn_init", self._c.rknn_init(context, model, len(model), flag, None))

    # int rknn_set_core_mask(rknn_context context, rknn_core_mask core_mask);
    @c_function("rknn_set_core_mask", [rknn_context, ctypes.c_int], ctypes.c_int)
    def rknn_set_core_mask(self, context: int, mask: int) -> None:
        _checked("rknn_set_core_mask", self._c.rknn_set_core_mask(context, mask),
                 f"mask {mask:#x}")

    # int rknn_query(rknn_context context, rknn_query_cmd cmd, void* info, uint32_t size);
    @c_function("rknn_query", [rknn_context, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32],
                 ctypes.c_int)
    def rknn_query(self, context: int, cmd: RknnQueryCmd, info: ctypes.Structure) -> None:
        status = self._c.rknn_query(context, int(cmd), ctypes.byref(info), ctypes.sizeof(info))
        _checked("rknn_query", status, cmd.name)

    # int rknn_inputs_set(rknn_context context, uint32_t n_inputs, rknn_input inputs[]);
    @c_function("rknn_inputs_set", [rknn_context, ctypes.c_uint32, ctypes.POINTER(RknnInput)],
                 ctypes.c_int)
    def rknn_inputs_set(self, context: int, inputs) -> None:
        _checked("rknn_inputs_set", self._c.rknn_inputs_set(context, len(inputs), inputs))

    # int rknn_run(rknn_context context, rknn_run_extend* extend);
    @c_function("rknn_run", [rknn_context, ctypes.c_void_p], ctypes.c_int)
    def rknn_run(self, context: int) -> None:
        _checked("rknn_run", self._c.rknn_run(context, None))

    # int rknn_outputs_get(rknn_context context, uint32_t n_outputs, rknn_output outputs[],
    #                      rknn_output_extend* extend);
    @c_function("rknn_outputs_get", [rknn_context, ctypes.c_uint32, ctypes.POINTER(RknnOutput),
                                      ctypes.c_void_p], ctypes.c_int)
    def rknn_outputs_get(self, context: int, outputs) -> None:
        _checked("rknn_outputs_get", self._c.rknn_outputs_get(context, len(outputs), outputs, None))

    # int rknn_outputs_release(rknn_context context, uint32_t n_outputs, rknn_output outputs[]);
    @c_function("rknn_outputs_release", [rknn_context, ctypes.c_uint32,
                                          ctypes.POINTER(RknnOutput)], ctypes.c_int)
    def rknn_outputs_release(self, context: int, outputs) -> None:
        status = self._c.rknn_outputs_release(context, len(outputs), outputs)
        _checked("rknn_outputs_release", status)

    # int rknn_destroy(rknn_context context);
    @c_function("rknn_destroy", [rknn_context], ctypes.c_int)
    def rknn_destroy(self, context: int) -> None:
        _checked("rknn_destroy", self._c.rknn_destroy(context))


# ========================================= 3. finding the library

LIBRARY_FILE = "librknnrt.so"
LIBRARY_ENV = "RKNN_LIB_PATH"
# Where the dynamic linker looks besides the folders rkllm_ctypes already tries.
_LINKER_FALLBACK_DIRS = ("/lib", "/usr/lib64", "/lib64")


def find_library(configured: str = "", folders: Optional[tuple] = None) -> str:
    """The librknnrt to load: `configured` (a file or a folder) when set, else the
    folders librkllmrt is looked for in, else the dynamic linker's search."""
    if configured:
        path = os.path.expanduser(configured)
        candidate = os.path.join(path, LIBRARY_FILE) if os.path.isdir(path) else path
        if os.path.isfile(candidate):
            return candidate
        raise RknnLoadError(f"librknnrt not found: {LIBRARY_ENV}={configured!r} "
                            f"(looked at {candidate})")
    if folders is None:
        folders = rkllm_ctypes.STANDARD_LIBRARY_DIRS  # read now, so one list serves both
    looked = []
    for folder in folders:
        candidate = os.path.join(folder, LIBRARY_FILE)
        looked.append(candidate)
        if os.path.isfile(candidate):
            return candidate
    found = _find_with_linker()
    if found:
        return found
    looked.append("the dynamic linker's search path (ctypes.util.find_library('rknnrt'))")
    raise RknnLoadError(f"{LIBRARY_FILE} not found; looked at: " + ", ".join(looked)
                        + f". Set {LIBRARY_ENV} to the library file or its folder.")


def _find_with_linker() -> Optional[str]:
    soname = ctypes.util.find_library("rknnrt")
    if not soname:
        return None
    # LD_LIBRARY_PATH changed after start-up is seen by find_library but not by
    # dlopen, so prefer the file itself; a bare soname is for the linker's cache.
    folders = os.environ.get("LD_LIBRARY_PATH", "").split(":") + list(_LINKER_FALLBACK_DIRS)
    for folder in filter(None, folders):
        candidate = os.path.join(folder, soname)
        if os.path.isfile(candidate):
            return candidate
    return soname


def load_library(configured: str = "") -> Librknnrt:
    """Finds and binds librknnrt; `configured` falls back to $RKNN_LIB_PATH."""
    path = find_library(configured or os.environ.get(LIBRARY_ENV, ""))
    try:
        cdll = ctypes.CDLL(path)
    except OSError as exc:
        raise RknnLoadError(f"cannot load {path}: {exc}") from exc
    return Librknnrt(cdll, path)


# ========================================================= 4. the encoder

# What the encoder is fed, by the type the model reports. Quantised models take raw
# pixels (their mean/std were folded in at conversion); float models take float32,
# which the runtime converts to float16 itself (pass_through=0).
_INPUT_DTYPES = {RknnTensorType.UINT8: "uint8", RknnTensorType.INT8: "uint8",
                 RknnTensorType.FLOAT32: "float32", RknnTensorType.FLOAT16: "float32"}
_C_TYPE_OF = {"uint8": RknnTensorType.UINT8, "float32": RknnTensorType.FLOAT32}


@dataclass(frozen=True)
class InputSpec:
    """The image the encoder expects, as the library reports it."""
    height: int
    width: int
    channels: int
    layout: str          # "NHWC" or "NCHW"
    dtype: str           # "uint8" or "float32": what encode() must be given
    shape: tuple         # the full reported shape, batch first

    @classmethod
    def from_attr(cls, attr: RknnTensorAttr, model_path: str) -> "InputSpec":
        shape = attr.shape()
        try:
            layout = RknnTensorFormat(attr.fmt)
            dtype = _INPUT_DTYPES[RknnTensorType(attr.type)]
        except (ValueError, KeyError):
            raise RknnLoadError(f"{model_path}: unsupported input tensor (format {attr.fmt}, "
                                f"type {attr.type})") from None
        if len(shape) != 4 or layout is RknnTensorFormat.NC1HWC2:
            raise RknnLoadError(f"{model_path}: input {shape} in {layout.name} is not an "
                                "NHWC or NCHW image")
        if layout is RknnTensorFormat.NHWC:
            _, height, width, channels = shape
        else:
            _, channels, height, width = shape
        return cls(height, width, channels, layout.name, dtype, shape)


@dataclass(frozen=True)
class OutputSpec:
    index: int
    name: str
    shape: tuple
    n_elems: int


class RknnEncoder:
    """One .rknn vision encoder on the NPU. encode() is serialised (one context runs
    one inference at a time); close() is idempotent."""

    def __init__(self, model_path: str, lib_path: str = "",
                 core_mask: Optional[int] = None):
        """core_mask None leaves the runtime's default (AUTO); RK356x boards reject any
        explicit mask, so it is only set when asked for."""
        self.model_path = model_path
        try:
            with open(model_path, "rb") as handle:
                model = handle.read()
        except OSError as exc:
            raise RknnLoadError(f"cannot read the vision encoder {model_path}: {exc}") from exc
        if not 0 < len(model) < 2 ** 32:  # size 0 would make the runtime take it as a path
            raise RknnLoadError(f"{model_path}: {len(model)} bytes is not a loadable .rknn "
                                "model (empty, or too large for a 32-bit size)")
        self._api = load_library(lib_path)
        self.library_path = self._api.path
        self._lock = threading.Lock()
        self._context = rknn_context(0)
        # The runtime parses the model during init and keeps no pointer into the
        # buffer, so the (often GB-sized) bytes are dropped when __init__ returns.
        self._api.rknn_init(ctypes.byref(self._context), model)
        try:
            if core_mask is not None:
                self._api.rknn_set_core_mask(self._context.value, int(core_mask))
            self.input_spec, self.output_specs = self._describe()
        except BaseException:
            self.close()
            raise
        log.info("loaded vision encoder %s: input %s, outputs %s", model_path,
                 self.input_spec, [o.shape for o in self.output_specs])

    def _describe(self) -> tuple:
        counts = RknnInputOutputNum()
        self._api.rknn_query(self._context.value, RknnQueryCmd.IN_OUT_NUM, counts)
        if counts.n_input != 1 or counts.n_output < 1:
            raise RknnLoadError(f"{self.model_path}: {counts.n_input} inputs and "
                                f"{counts.n_output} outputs; a vision encoder has one image "
                                "input and at least one output")
        spec = InputSpec.from_attr(self._query_attr(RknnQueryCmd.INPUT_ATTR, 0), self.model_path)
        outputs = []
        for index in range(counts.n_output):
            attr = self._query_attr(RknnQueryCmd.OUTPUT_ATTR, index)
            outputs.append(OutputSpec(index, attr.name.decode("utf-8", "replace"),
                                      attr.shape(), int(attr.n_elems)))
        return spec, tuple(outputs)

    def _query_attr(self, cmd: RknnQueryCmd, index: int) -> RknnTensorAttr:
        attr = RknnTensorAttr(index=index)  # the runtime reads which tensor from index
        self._api.rknn_query(self._context.value, cmd, attr)
        return attr

    def encode(self, image) -> "numpy.ndarray":
        """The first output for one preprocessed image (shape `input_spec.shape`,
        dtype `input_spec.dtype`), as float32 in the shape the library reports."""
        return self.encode_all(image)[0]

    def encode_all(self, image) -> list:
        """Every output of the encoder for one image, as float32 arrays."""
        import numpy  # only the encoder path needs it
        pixels = numpy.ascontiguousarray(image)
        self._check_input(pixels)
        with self._lock:
            context = self._require_open()
            c_input = (RknnInput * 1)(RknnInput(
                index=0, buf=pixels.ctypes.data, size=pixels.nbytes, pass_through=0,
                type=_C_TYPE_OF[self.input_spec.dtype],
                fmt=RknnTensorFormat[self.input_spec.layout]))
            self._api.rknn_inputs_set(context, c_input)
            self._api.rknn_run(context)
            return self._take_outputs(context, numpy)

    def _check_input(self, pixels) -> None:
        spec = self.input_spec
        if pixels.dtype.name != spec.dtype or tuple(pixels.shape) != spec.shape:
            raise ValueError(f"the encoder takes {spec.dtype} {spec.shape} ({spec.layout}); "
                             f"got {pixels.dtype.name} {tuple(pixels.shape)}")

    def _take_outputs(self, context: int, numpy) -> list:
        outputs = (RknnOutput * len(self.output_specs))()
        for slot, spec in zip(outputs, self.output_specs):
            slot.index, slot.want_float, slot.is_prealloc = spec.index, 1, 0
        self._api.rknn_outputs_get(context, outputs)
        try:
            arrays = []
            for slot, spec in zip(outputs, self.output_specs):
                if not slot.buf or slot.size != spec.n_elems * 4:
                    raise RknnError("rknn_outputs_get", None, f"output {spec.index} holds "
                                    f"{slot.size} bytes, expected {spec.n_elems} floats")
                floats = (ctypes.c_float * spec.n_elems).from_address(slot.buf)
                # copied: the buffer belongs to the runtime and is freed just below
                arrays.append(numpy.frombuffer(floats, dtype=numpy.float32)
                              .reshape(spec.shape).copy())
            return arrays
        finally:
            self._api.rknn_outputs_release(context, outputs)

    def _require_open(self) -> int:
        if not self._context.value:
            raise RknnLoadError(f"the vision encoder {self.model_path} is closed")
        return self._context.value

    def close(self) -> None:
        with self._lock:
            context, self._context = self._context.value, rknn_context(0)
        if context:
            try:
                self._api.rknn_destroy(context)
            except RknnError as exc:
                log.warning("%s for %s", exc, self.model_path)

    def __enter__(self) -> "RknnEncoder":
        return self

    def __exit__(self, *exc_info) -> bool:
        self.close()
        return False

    def __repr__(self) -> str:
        return f"RknnEncoder({self.model_path!r}, lib={self.library_path!r})"
