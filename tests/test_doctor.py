"""rkllm-api doctor against fake system trees: every /dev, /sys and /proc file it reads
lives under a temporary root, the libraries are files holding an aarch64 ELF header and
the version banner the binding reads, and the models are small files in a models root."""
from __future__ import annotations

import json
import logging
import os
import struct

import pytest

from rkllm_api import doctor
from rkllm_api.config import Settings
from rkllm_api.doctor import ERROR, OK, WARN, run_doctor
from support.board import aarch64_library, make_board, write

def add_model(models, folder: str, name: str, content: bytes = b"RKLLM-MODEL" * 100) -> str:
    return write(models, f"{folder}/{name}", content)


def settings_for(models) -> Settings:
    return Settings(models_root=str(models), include_bundled_model=False, rkllm_lib_path="",
                    rkllm_abi="")


def doctor_run(root, models, **kwargs):
    return run_doctor(settings_for(models), root=str(root), cpu_runtime=True, **kwargs)


def levels(report, subject):
    return [f.level for f in report.findings if f.subject == subject]


def messages(report) -> str:
    return "\n".join(f.message for f in report.findings)


@pytest.fixture
def models(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    return folder


# ------------------------------------------------------------------ boards

def test_healthy_1_2_board(tmp_path, models):
    root = make_board(tmp_path / "root", runtime="1.2.3")
    add_model(models, "Qwen3-1.7B-4k", "qwen3-1.7b_w8a8_rk3588.rkllm")
    report = doctor_run(root, models)
    assert (report.board, report.npu_node, report.driver_version) == ("rk3588", "/dev/rknpu", "0.9.8")
    assert (report.library_versions, report.library_abi) == (("1.2.3",), "1.2")
    assert report.library_path == os.path.join(root, "usr/lib/librkllmrt.so")
    assert not [f for f in report.findings if f.level in (WARN, ERROR)], messages(report)
    assert "cpu" not in {f.subject for f in report.findings}   # SVE only matters on 1.3.0
    [model] = report.models
    assert (model.id, model.device, model.context_length) == ("qwen3-1.7b-4k", "npu", 4096)
    assert model.size_bytes == 1100 and model.runnable and not model.problems
    assert report.exit_status() == 0


def test_healthy_1_3_board_with_sve(tmp_path, models):
    root = make_board(tmp_path / "root", runtime="1.3.0", sve=True)
    add_model(models, "gemma-3-1b", "gemma-3-1b_rk3588.rkllm")
    report = doctor_run(root, models)
    assert report.library_abi == "1.3"
    assert levels(report, "cpu") == [OK]
    assert report.models[0].runnable and report.exit_status() == 0


def test_vendor_drm_render_node_counts_as_the_npu(tmp_path, models):
    root = make_board(tmp_path / "root", node="drm")
    add_model(models, "m", "m.rkllm")
    report = doctor_run(root, models)
    assert report.npu_node == "/dev/dri/renderD129"
    assert levels(report, "npu") == [OK] and report.exit_status() == 0


def test_no_device_node_blocks_npu_models(tmp_path, models):
    root = make_board(tmp_path / "root", node=None, driver=None)
    add_model(models, "m", "m.rkllm")
    report = doctor_run(root, models)
    assert levels(report, "npu") == [ERROR]
    assert "no NPU device node" in messages(report)
    assert not report.models[0].runnable
    assert report.serving_blocked and report.exit_status() == 1


def test_rocket_driver_is_named(tmp_path, models):
    root = make_board(tmp_path / "root", node="rocket", driver=None, runtime="1.3.0", sve=True)
    add_model(models, "m", "m.rkllm")
    report = doctor_run(root, models)
    [npu] = [f for f in report.findings if f.subject == "npu"]
    assert npu.level == ERROR and "rocket" in npu.message and "570" in npu.message
    assert report.exit_status() == 1


def test_1_3_without_sve_dies_with_illegal_instruction(tmp_path, models):
    root = make_board(tmp_path / "root", runtime="1.3.0", sve=False)
    add_model(models, "m", "m_rk3588.rkllm")
    report = doctor_run(root, models)
    [cpu] = [f for f in report.findings if f.subject == "cpu"]
    assert cpu.level == ERROR
    assert "Illegal instruction" in cpu.message and "518" in cpu.message
    assert not report.models[0].runnable and report.exit_status() == 1


def test_model_built_for_another_platform(tmp_path, models):
    root = make_board(tmp_path / "root", soc="rk3588s")      # S variant runs rk3588 models
    add_model(models, "qwen-3576", "qwen2.5-1.5b_w4a16_rk3576.rkllm")
    add_model(models, "Qwen2.5-3B-rk3588-1.1.1", "model.rkllm")  # platform in the folder name
    report = doctor_run(root, models)
    assert report.board == "rk3588"
    by_id = {m.id: m for m in report.models}
    wrong = by_id["qwen-3576"]
    assert not wrong.runnable
    assert any("built for rk3576" in p.message and "rk3588" in p.message for p in wrong.problems)
    assert by_id["qwen2.5-3b-rk3588-1.1.1"].runnable
    assert report.exit_status() == 0   # one model can still be served


def test_missing_and_unknown_librkllmrt(tmp_path, models):
    add_model(models, "m", "m.rkllm")
    root = make_board(tmp_path / "none", runtime=None)
    report = doctor_run(root, models)
    assert levels(report, "librkllmrt") == [ERROR] and "not found" in messages(report)
    root = make_board(tmp_path / "unknown", runtime="1.4.0")
    report = doctor_run(root, models)
    assert levels(report, "librkllmrt") == [ERROR] and "RKLLM_ABI" in messages(report)
    assert report.exit_status() == 1


def test_x86_library_on_a_board_is_refused(tmp_path, models, rkllm_double_libs):
    root = make_board(tmp_path / "root", runtime=None)
    add_model(models, "m", "m.rkllm")
    settings = settings_for(models).with_(rkllm_lib_path=rkllm_double_libs["1.2"])
    report = run_doctor(settings, root=root, cpu_runtime=True)
    [lib] = [f for f in report.findings if f.subject == "librkllmrt"]
    assert lib.level == ERROR and "x86-64" in lib.message and "not aarch64" in lib.message


def test_old_driver_and_module_version_file(tmp_path, models):
    root = make_board(tmp_path / "root", driver=None)
    write(root, "/sys/module/rknpu/version", "0.9.3\n")
    add_model(models, "m", "m.rkllm")
    report = doctor_run(root, models)
    assert report.driver_version == "0.9.3"
    assert levels(report, "driver") == [WARN]
    assert report.exit_status() == 0   # a warning, not a blocker


# ------------------------------------------------------------------ models and memory

def gguf_bytes(tensor_elements: int = 4, data: bytes = None) -> bytes:
    """A minimal valid GGUF v3: one metadata key and one F32 tensor (the file checks
    themselves are tested in test_gguf.py)."""
    def text(value: str) -> bytes:
        return struct.pack("<Q", len(value)) + value.encode()
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)
    header += text("general.architecture") + struct.pack("<I", 8) + text("llama")
    header += text("weight") + struct.pack("<I", 1) + struct.pack("<Q", tensor_elements)
    header += struct.pack("<IQ", 0, 0)                      # F32 at offset 0
    header = header.ljust(-(-len(header) // 32) * 32, b"\0")
    return header + (data if data is not None else b"\0" * 4 * tensor_elements)


def test_cpu_models_on_a_machine_without_npu(tmp_path, models):
    root = make_board(tmp_path / "root", soc=None, node=None, driver=None, runtime=None)
    write(models, "tiny/tiny.gguf", gguf_bytes())
    write(models, "broken/broken.gguf", gguf_bytes()[:-6])
    report = doctor_run(root, models)
    # Nothing here needs the NPU: its absence is a warning.
    assert ERROR not in [f.level for f in report.findings]
    by_id = {m.id: m for m in report.models}
    assert by_id["tiny"].runnable and by_id["tiny"].device == "cpu"
    assert not by_id["broken"].runnable
    assert report.exit_status() == 0
    no_runtime = run_doctor(settings_for(models), root=root, cpu_runtime=False)
    assert no_runtime.exit_status() == 1


def test_model_size_against_memory(tmp_path, models):
    root = make_board(tmp_path / "root", mem_total=1 << 20, mem_available=2048)
    add_model(models, "fits", "fits.rkllm", b"x" * 1024)
    add_model(models, "tight", "tight.rkllm", b"x" * 4096)
    add_model(models, "huge", "huge.rkllm", b"x" * (2 << 20))
    report = doctor_run(root, models)
    problems = {m.id: [p.level for p in m.problems] for m in report.models}
    assert problems == {"fits": [], "tight": [WARN], "huge": [ERROR]}
    assert report.mem_available == 2048 and report.mem_total == 1 << 20


def test_vision_model_needs_librknnrt(tmp_path, models):
    root = make_board(tmp_path / "root")
    add_model(models, "Qwen2-VL-2B", "qwen2-vl-2b_rk3588.rkllm")
    add_model(models, "Qwen2-VL-2B", "vision_rk3588.rknn")
    [model] = doctor_run(root, models).models
    assert [p.level for p in model.problems] == [WARN]
    assert "librknnrt" in model.problems[0].message and model.runnable
    aarch64_library(os.path.join(root, "usr/lib/librknnrt.so"), b"librknnrt version: 2.3.2")
    assert doctor_run(root, models).models[0].problems == []


def test_no_models_blocks_serving(tmp_path, models):
    report = doctor_run(make_board(tmp_path / "root"), models)
    assert report.models == [] and report.exit_status() == 1


# ------------------------------------------------------------------ command line

def test_main_prints_the_report(tmp_path, models, monkeypatch, capsys):
    root = make_board(tmp_path / "root", runtime="1.3.0", sve=False)
    add_model(models, "m", "m.rkllm")
    for name in ("RKLLM_LIB_PATH", "RKLLM_ABI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RKLLM_BUNDLED_MODEL", "0")
    assert doctor.main(["--root", root, "--models-root", str(models)]) == 1
    out = capsys.readouterr().out
    assert "Illegal instruction" in out and "0 of 1 models can run" in out
    assert doctor.main(["--root", root, "--models-root", str(models), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["serving_blocked"] is True and data["models"][0]["runnable"] is False


def test_check_library_file(tmp_path, rkllm_double_libs, capsys):
    good = aarch64_library(tmp_path / "a/librkllmrt.so", b"rkllm-runtime version: 1.3.0")
    assert doctor.check_library_file("rkllm", good) == 0
    assert "1.3.0 (ABI 1.3)" in capsys.readouterr().out
    assert doctor.check_library_file("rkllm", rkllm_double_libs["1.3"]) == 1
    assert "x86-64" in capsys.readouterr().err
    unknown = aarch64_library(tmp_path / "b/librkllmrt.so", b"no version here")
    assert doctor.check_library_file("rkllm", unknown) == 1
    rknn = aarch64_library(tmp_path / "c/librknnrt.so", b"librknnrt version: 2.3.2 (x)")
    assert doctor.check_library_file("rknn", rknn) == 0
    assert "librknnrt 2.3.2" in capsys.readouterr().out


# ------------------------------------------------------------------ NPU load and clock

def test_npu_load_per_core_and_frequency_without_root_rights(tmp_path):
    root = make_board(tmp_path / "root")
    assert doctor.npu_load(root) == {} and doctor.npu_frequency(root) is None
    write(root, "/proc/rknpu/load", "NPU load:  Core0: 37%, Core1:  0%, Core2: 100%,\n")
    write(root, "/sys/class/devfreq/fdab0000.npu/cur_freq", "1000000000\n")
    write(root, "/sys/class/devfreq/dmc/cur_freq", "2112000000\n")   # memory, not the NPU
    assert doctor.npu_load(root) == {0: 37, 1: 0, 2: 100}
    assert doctor.npu_frequency(root) == 1_000_000_000


def test_one_core_npu_and_the_driver_files_as_fallback(tmp_path):
    root = make_board(tmp_path / "root", soc="rk3576")
    write(root, "/sys/kernel/debug/rknpu/load", "NPU load: 12%\n")
    write(root, "/proc/rknpu/freq", "950000000\n")
    assert doctor.npu_load(root) == {0: 12}
    assert doctor.npu_frequency(root) == 950_000_000


# ------------------------------------------------------------------ the startup summary

def test_startup_summary_logs_each_finding_and_blocked_model(tmp_path, models, caplog):
    root = make_board(tmp_path / "root", runtime="1.3.0", sve=False)
    add_model(models, "m", "m_rk3588.rkllm")
    write(models, "cut.gguf", gguf_bytes()[:-6])          # a file directly in the root
    report = doctor_run(root, models)
    logger = logging.getLogger("test.startup")
    with caplog.at_level(logging.INFO, logger="test.startup"):
        doctor.log_summary(report, logger)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("INFO", "check board: Rockchip rk3588 (device tree)") in lines
    assert any(level == "ERROR" and message.startswith("check cpu:") and "518" in message
               for level, message in lines)
    assert any(level == "ERROR" and message.startswith("check model cut: truncated")
               for level, message in lines)
    assert lines[-1] == ("WARNING", "checks done: 0 of 2 models can run: nothing can be "
                                    "served (rkllm-api doctor explains)")
