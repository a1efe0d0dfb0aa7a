"""rknn_ctypes against the compiled librknnrt double: finding the library, init,
query, run, outputs, scripted failures and closing."""
from __future__ import annotations

import os
import shutil

import numpy
import pytest

import rknn_ctypes as rn
from support.rknn_double import make_fake_rknn_model


def patch_means(image_hwc: numpy.ndarray, grid: int) -> numpy.ndarray:
    """What the double returns per patch: channel means over a grid x grid cut."""
    h, w, c = image_hwc.shape
    rows = []
    for t in range(grid * grid):
        y0, y1 = (t // grid) * h // grid, (t // grid + 1) * h // grid
        x0, x1 = (t % grid) * w // grid, (t % grid + 1) * w // grid
        rows.append(image_hwc[y0:y1, x0:x1].reshape(-1, c).astype(numpy.float64).mean(axis=0))
    return numpy.array(rows)


@pytest.fixture
def encoder_at(tmp_path, rknn_double_lib, rknn_record):
    """Opens an encoder on a fake model with the given attributes; closes them all."""
    opened = []

    def open_encoder(core_mask=None, **attributes):
        model = make_fake_rknn_model(tmp_path / "models", **attributes)
        encoder = rn.RknnEncoder(model, lib_path=rknn_double_lib, core_mask=core_mask)
        opened.append(encoder)
        return encoder

    yield open_encoder
    for encoder in opened:
        encoder.close()


# ------------------------------------------------------------- finding the library


def test_a_configured_file_or_folder_is_used(rknn_double_lib):
    assert rn.find_library(rknn_double_lib) == rknn_double_lib
    assert rn.find_library(os.path.dirname(rknn_double_lib)) == rknn_double_lib


def test_a_configured_path_without_the_library_names_what_it_looked_at(tmp_path):
    with pytest.raises(rn.RknnLoadError) as caught:
        rn.find_library(str(tmp_path))
    assert "RKNN_LIB_PATH" in str(caught.value)
    assert str(tmp_path / "librknnrt.so") in str(caught.value)


def test_the_usual_folders_are_searched_in_order(tmp_path, rknn_double_lib):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    shutil.copy(rknn_double_lib, second / "librknnrt.so")
    assert rn.find_library("", folders=(str(first), str(second))) == str(
        second / "librknnrt.so")


def test_the_default_folders_are_librkllmrts(monkeypatch, tmp_path):
    import rkllm_ctypes
    monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path))
    if any(os.path.isfile(os.path.join(folder, "librknnrt.so"))
           for folder in rkllm_ctypes.STANDARD_LIBRARY_DIRS) or rn._find_with_linker():
        pytest.skip("this machine has a real librknnrt installed")
    with pytest.raises(rn.RknnLoadError) as caught:
        rn.find_library("")
    for folder in rkllm_ctypes.STANDARD_LIBRARY_DIRS:
        assert os.path.join(folder, "librknnrt.so") in str(caught.value)


def test_the_dynamic_linker_is_asked_last(monkeypatch, tmp_path, rknn_double_lib):
    shutil.copy(rknn_double_lib, tmp_path / "librknnrt.so")
    monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path))
    assert rn.find_library("", folders=()) == str(tmp_path / "librknnrt.so")


def test_nothing_found_lists_every_place(monkeypatch, tmp_path):
    monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path))
    if rn._find_with_linker():
        pytest.skip("this machine has a real librknnrt the linker finds")
    with pytest.raises(rn.RknnLoadError) as caught:
        rn.find_library("", folders=(str(tmp_path / "a"), str(tmp_path / "b")))
    message = str(caught.value)
    assert str(tmp_path / "a" / "librknnrt.so") in message
    assert str(tmp_path / "b" / "librknnrt.so") in message
    assert "dynamic linker" in message and "RKNN_LIB_PATH" in message


def test_the_environment_variable_is_used_when_no_path_is_given(monkeypatch, tmp_path,
                                                                rknn_double_lib):
    monkeypatch.setenv("RKNN_LIB_PATH", os.path.dirname(rknn_double_lib))
    model = make_fake_rknn_model(tmp_path, h=4, w=4, out="1x3")
    with rn.RknnEncoder(model) as encoder:
        assert encoder.library_path == rknn_double_lib


def test_a_file_that_is_not_a_library_is_refused(tmp_path):
    fake = tmp_path / "librknnrt.so"
    fake.write_text("not an ELF file")
    with pytest.raises(rn.RknnLoadError, match="cannot load"):
        rn.load_library(str(fake))


def test_a_library_without_the_functions_is_refused(rkllm_double_libs):
    with pytest.raises(rn.RknnLoadError, match="does not export rknn_init"):
        rn.load_library(rkllm_double_libs["1.3"])


# ----------------------------------------------------------------- init and query


def test_init_passes_the_model_bytes_and_query_reports_the_input(encoder_at, rknn_record):
    encoder = encoder_at(h=448, w=336, c=3, layout="NHWC", type="uint8", out="1x256x64")
    assert encoder.input_spec == rn.InputSpec(448, 336, 3, "NHWC", "uint8", (1, 448, 336, 3))
    assert [o.shape for o in encoder.output_specs] == [(1, 256, 64)]
    init = rknn_record.last("init")
    assert init["status"] == 0 and init["from_path"] is False and init["flag"] == 0
    assert init["size"] == os.path.getsize(encoder.model_path)
    assert init["header"].startswith("FAKE-RKNN h=448 w=336")
    queries = rknn_record.entries("query")
    assert [(q["cmd"], q["size"], q["index"]) for q in queries] == [(0, 8, -1), (1, 376, 0),
                                                                    (2, 376, 0)]


@pytest.mark.parametrize("layout,model_type,shape,dtype", [
    ("NCHW", "float32", (1, 3, 32, 48), "float32"),
    ("NCHW", "float16", (1, 3, 32, 48), "float32"),  # the runtime converts float32 for us
    ("NHWC", "int8", (1, 32, 48, 3), "uint8"),       # quantised: raw pixels go in
])
def test_input_spec_follows_what_the_library_reports(encoder_at, layout, model_type, shape,
                                                     dtype):
    spec = encoder_at(h=32, w=48, layout=layout, type=model_type, out="4x8").input_spec
    assert (spec.height, spec.width, spec.channels) == (32, 48, 3)
    assert (spec.layout, spec.dtype, spec.shape) == (layout, dtype, shape)


def test_an_input_that_is_not_an_image_is_refused(tmp_path, rknn_double_lib, rknn_record):
    model = make_fake_rknn_model(tmp_path, h=4, w=4, out="1x3", layout="NC1HWC2")
    with pytest.raises(rn.RknnLoadError, match="in NC1HWC2 is not an NHWC or NCHW image"):
        rn.RknnEncoder(model, lib_path=rknn_double_lib)
    assert rknn_record.last("destroy")["status"] == 0


def test_the_core_mask_is_set_only_when_asked(encoder_at, rknn_record):
    encoder_at(h=4, w=4, out="1x3")
    assert rknn_record.entries("set_core_mask") == []
    encoder_at(core_mask=rn.RknnCoreMask.CORE_0_1_2, h=4, w=4, out="1x3")
    assert rknn_record.last("set_core_mask") == {"call": "set_core_mask", "status": 0,
                                                 "mask": 7}


# --------------------------------------------------------------------- encoding


def test_encode_returns_the_float_output_computed_from_the_pixels(encoder_at, rknn_record):
    encoder = encoder_at(h=32, w=32, layout="NHWC", type="uint8", out="1x16x8")
    image = numpy.random.default_rng(7).integers(0, 256, (1, 32, 32, 3), dtype=numpy.uint8)
    output = encoder.encode(image)
    assert output.dtype == numpy.float32 and output.shape == (1, 16, 8)
    numpy.testing.assert_allclose(output[0, :, :3], patch_means(image[0], 4), rtol=1e-6)
    assert not output[0, :, 3:].any()
    sent = rknn_record.last("inputs_set")
    assert (sent["size"], sent["type"], sent["fmt"], sent["pass_through"]) == (3072, 3, 1, 0)
    assert sent["sum"] == pytest.approx(float(image.sum()))
    got = rknn_record.last("outputs_get")
    assert (got["want_float"], got["is_prealloc"], got["index"]) == (1, 0, 0)
    assert rknn_record.last("outputs_release")["outstanding"] == 0


def test_nchw_float_input_reaches_the_encoder_in_its_layout(encoder_at, rknn_record):
    encoder = encoder_at(h=16, w=16, layout="NCHW", type="float16", out="4x3")
    image_hwc = numpy.random.default_rng(3).random((16, 16, 3), dtype=numpy.float32) - 0.5
    output = encoder.encode(numpy.ascontiguousarray(image_hwc.transpose(2, 0, 1)[None]))
    numpy.testing.assert_allclose(output, patch_means(image_hwc, 2), rtol=1e-5, atol=1e-6)
    assert (rknn_record.last("inputs_set")["type"], rknn_record.last("inputs_set")["fmt"]) == (0, 0)


def test_outputs_are_copies_that_outlive_the_next_run(encoder_at):
    encoder = encoder_at(h=4, w=4, out="1x3")
    first = encoder.encode(numpy.full((1, 4, 4, 3), 10, numpy.uint8))
    second = encoder.encode(numpy.full((1, 4, 4, 3), 200, numpy.uint8))
    assert first.tolist() == [[10.0, 10.0, 10.0]]
    assert second.tolist() == [[200.0, 200.0, 200.0]]


@pytest.mark.parametrize("bad", [numpy.zeros((1, 8, 8, 3), numpy.float32),
                                 numpy.zeros((1, 3, 8, 8), numpy.uint8),
                                 numpy.zeros((8, 8, 3), numpy.uint8)])
def test_a_wrong_array_is_refused_before_any_call(encoder_at, rknn_record, bad):
    encoder = encoder_at(h=8, w=8, layout="NHWC", type="uint8", out="4x3")
    with pytest.raises(ValueError, match=r"uint8 \(1, 8, 8, 3\)"):
        encoder.encode(bad)
    assert rknn_record.entries("inputs_set") == []


# ------------------------------------------------------------------------ failures


def test_init_failure_raises_with_the_function_and_code(tmp_path, rknn_double_lib, rknn_record):
    model = make_fake_rknn_model(tmp_path, h=4, w=4, out="1x3", fail="init:-6")
    with pytest.raises(rn.RknnError) as caught:
        rn.RknnEncoder(model, lib_path=rknn_double_lib)
    assert (caught.value.function, caught.value.code) == ("rknn_init", -6)
    assert "rknn_init failed with code -6" in str(caught.value)
    assert rknn_record.entries("destroy") == []  # nothing to destroy: there is no context


def test_a_file_that_is_not_a_model_fails_init(tmp_path, rknn_double_lib):
    model = tmp_path / "broken.rknn"
    model.write_bytes(b"\x7fELF not a model")
    with pytest.raises(rn.RknnError, match=r"rknn_init failed with code -1 \(generic failure\)"):
        rn.RknnEncoder(str(model), lib_path=rknn_double_lib)


@pytest.mark.parametrize("content", [None, b""])
def test_a_missing_or_empty_model_file_is_refused_before_init(tmp_path, rknn_double_lib,
                                                              rknn_record, content):
    model = tmp_path / "vision.rknn"
    if content is not None:
        model.write_bytes(content)
    with pytest.raises(rn.RknnLoadError, match="vision.rknn"):
        rn.RknnEncoder(str(model), lib_path=rknn_double_lib)
    assert rknn_record.entries() == []


@pytest.mark.parametrize("directive,function", [("query:-2", "rknn_query"),
                                                ("set_core_mask:-4", "rknn_set_core_mask")])
def test_a_failure_after_init_destroys_the_context(tmp_path, rknn_double_lib, rknn_record,
                                                   directive, function):
    model = make_fake_rknn_model(tmp_path, h=4, w=4, out="1x3", fail=directive)
    with pytest.raises(rn.RknnError) as caught:
        rn.RknnEncoder(model, lib_path=rknn_double_lib, core_mask=rn.RknnCoreMask.CORE_0)
    assert caught.value.function == function
    assert caught.value.code == int(directive.split(":")[1])
    assert rknn_record.last("destroy")["status"] == 0


def test_a_mask_the_board_cannot_do_is_an_error(tmp_path, rknn_double_lib, rknn_record):
    model = make_fake_rknn_model(tmp_path, h=4, w=4, out="1x3", cores=2)  # an RK3576
    with pytest.raises(rn.RknnError, match="rknn_set_core_mask failed with code -1.*mask 0x7"):
        rn.RknnEncoder(model, lib_path=rknn_double_lib, core_mask=rn.RknnCoreMask.CORE_0_1_2)
    with rn.RknnEncoder(model, lib_path=rknn_double_lib,
                        core_mask=rn.RknnCoreMask.CORE_0_1) as encoder:
        assert encoder.input_spec.height == 4


@pytest.mark.parametrize("call,function", [("inputs_set", "rknn_inputs_set"),
                                           ("run", "rknn_run"),
                                           ("outputs_get", "rknn_outputs_get")])
def test_run_failures_raise_and_the_encoder_stays_usable(encoder_at, monkeypatch, rknn_record,
                                                         call, function):
    encoder = encoder_at(h=4, w=4, out="1x3")
    image = numpy.full((1, 4, 4, 3), 7, numpy.uint8)
    monkeypatch.setenv("FAKE_RKNN_FAIL", f"{call}:-3")
    with pytest.raises(rn.RknnError) as caught:
        encoder.encode(image)
    assert (caught.value.function, caught.value.code) == (function, -3)
    monkeypatch.delenv("FAKE_RKNN_FAIL")
    assert encoder.encode(image).tolist() == [[7.0, 7.0, 7.0]]
    assert rknn_record.last("outputs_release")["outstanding"] == 0


def test_outputs_are_released_even_when_release_fails_later(encoder_at, monkeypatch,
                                                            rknn_record):
    encoder = encoder_at(h=4, w=4, out="1x3")
    monkeypatch.setenv("FAKE_RKNN_FAIL", "outputs_release:-9")
    with pytest.raises(rn.RknnError, match="rknn_outputs_release failed with code -9"):
        encoder.encode(numpy.zeros((1, 4, 4, 3), numpy.uint8))
    assert rknn_record.last("outputs_get")["status"] == 0


# ------------------------------------------------------------------------- closing


def test_close_twice_destroys_once(encoder_at, rknn_record):
    encoder = encoder_at(h=4, w=4, out="1x3")
    encoder.encode(numpy.zeros((1, 4, 4, 3), numpy.uint8))
    encoder.close()
    encoder.close()
    destroys = rknn_record.entries("destroy")
    assert destroys == [{"call": "destroy", "status": 0, "outstanding": 0}]


def test_encode_after_close_is_a_clean_error(encoder_at, rknn_record):
    encoder = encoder_at(h=4, w=4, out="1x3")
    encoder.close()
    with pytest.raises(rn.RknnLoadError, match="is closed"):
        encoder.encode(numpy.zeros((1, 4, 4, 3), numpy.uint8))
    assert rknn_record.entries("inputs_set") == []


def test_a_failing_destroy_is_logged_not_raised(encoder_at, monkeypatch, rknn_record, caplog):
    encoder = encoder_at(h=4, w=4, out="1x3")
    monkeypatch.setenv("FAKE_RKNN_FAIL", "destroy:-7")
    encoder.close()
    encoder.close()
    assert len(rknn_record.entries("destroy")) == 1
    assert "rknn_destroy failed with code -7" in caplog.text
