"""rkllm-api doctor: what on this machine keeps a model from being served, read from
the files the kernel and the Rockchip libraries leave behind.

Nothing is loaded or run: the NPU device node, the rknpu driver's version files, the
device tree, /proc/cpuinfo and /proc/meminfo are read as files, librkllmrt's ELF header
and embedded version text as bytes (rkllm_ctypes.read_embedded_version), the models
through the registry and their headers. So it runs anywhere, board or not, and
`root` prefixes every system path (/dev, /sys, /proc, the library folders) so tests
can hand it a fake tree. The models root and RKLLM_LIB_PATH are the server's own
settings and are used as given.

Known failures it names, from Rockchip's issue trackers:
- the mainline "rocket" NPU driver (Linux 6.18+) has no /dev/rknpu and speaks another
  interface; librkllmrt (1.3.0 included) needs the vendor rknpu driver
  (airockchip/rknn-toolkit2 issue 570);
- librkllmrt 1.3.0 is built with SVE instructions: on cores without SVE (RK3588's
  Cortex-A76/A55) it dies with "Illegal instruction" (airockchip/rknn-llm issue 518);
  1.2.3 checks for SVE and falls back to NEON.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import struct
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

from rkllm_api.runtimes.encoder import RKNN_LIBRARY_FILE, rknn_library

OK, INFO, WARN, ERROR = "ok", "info", "warn", "error"

EM_AARCH64, ET_DYN, ELFCLASS64 = 183, 3, 2
_ELF_MACHINES = {183: "aarch64", 62: "x86-64", 40: "32-bit arm", 243: "riscv", 3: "x86"}

# Where the rknpu driver reports its version: debugfs (root only), procfs (when the
# kernel enables RKNPU_PROC_FS), and the module's own version attribute.
DRIVER_VERSION_FILES = ("/sys/kernel/debug/rknpu/version", "/proc/rknpu/version",
                        "/proc/debug/rknpu/version", "/sys/module/rknpu/version")
# The driver's load report ("NPU load:  Core0: 12%, Core1:  0%, Core2:  0%,", or
# "NPU load: 12%" on a one-core NPU): procfs is readable by every user when the kernel
# has RKNPU_PROC_FS; debugfs usually only by root.
LOAD_FILES = ("/proc/rknpu/load", "/proc/debug/rknpu/load", "/sys/kernel/debug/rknpu/load")
# The NPU clock: the devfreq device of the NPU (fdab0000.npu on RK3588, 27700000.npu on
# RK3576) is world-readable; the driver's own "freq" file is the fallback.
DEVFREQ_CLASS = "/sys/class/devfreq"
FREQUENCY_FILES = ("/proc/rknpu/freq", "/sys/kernel/debug/rknpu/freq")
RECOMMENDED_DRIVER = (0, 9, 8)   # what the RKLLM SDK guide asks for
OLDEST_DRIVER = (0, 9, 6)        # older drivers are reported to fail with RKLLM
# Target platforms of rkllm-toolkit, as they appear in model file and folder names.
_PLATFORM = re.compile(r"(?<![a-z0-9])(rk3588|rk3576|rk3562|rv1126b)s?(?![0-9])", re.I)
_SOC_COMPATIBLE = re.compile(r"^rockchip,((?:rk|rv)\d{4}[a-z]?)$")
_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True)
class Finding:
    level: str      # ok | info | warn | error
    subject: str    # npu, driver, librkllmrt, cpu, memory, board, models
    message: str


@dataclass
class ModelCheck:
    id: str
    device: str                 # npu | cpu
    path: str
    context_length: int
    size_bytes: int
    problems: list = field(default_factory=list)   # of Finding

    @property
    def runnable(self) -> bool:
        return not any(p.level == ERROR for p in self.problems)


@dataclass
class Report:
    root: str
    board: str = ""                 # rk3588, rk3576... or "" when not a Rockchip board
    npu_node: str = ""              # /dev/rknpu or /dev/dri/renderDN, "" when none
    driver_version: str = ""
    library_path: str = ""
    library_versions: tuple = ()
    library_abi: str = ""
    mem_available: Optional[int] = None   # bytes
    mem_total: Optional[int] = None
    models_root: str = ""
    findings: list = field(default_factory=list)    # of Finding
    models: list = field(default_factory=list)      # of ModelCheck

    @property
    def serving_blocked(self) -> bool:
        """No model can run: the server would start but answer nothing."""
        return not any(m.runnable for m in self.models)

    def exit_status(self) -> int:
        return 1 if self.serving_blocked else 0

    def to_dict(self) -> dict:
        data = asdict(self)
        for model, check in zip(data["models"], self.models):
            model["runnable"] = check.runnable
        data["serving_blocked"] = self.serving_blocked
        return data


# ---------------------------------------------------------------- file access

def _at(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _read_text(root: str, path: str) -> Optional[str]:
    try:
        with open(_at(root, path), "rb") as handle:
            return handle.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return None


def _listdir(root: str, path: str) -> list:
    try:
        return sorted(os.listdir(_at(root, path)))
    except OSError:
        return []


def _version_tuple(text: str) -> Optional[tuple]:
    match = _VERSION.search(text or "")
    return tuple(int(part) for part in match.groups()) if match else None


def _gib(size: Optional[int]) -> str:
    """A size for people: 1.9 GiB, 98 MiB, 12 KiB, 7 B."""
    if size is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}" if unit == "GiB" else f"{size // scale} {unit}"
    return f"{size} B"


# ---------------------------------------------------------------- the board

def board_soc(root: str = "/") -> str:
    """The SoC from the device tree's compatible list ("rockchip,rk3588s" -> "rk3588":
    the S variant runs RK3588 models), "" when not a Rockchip board."""
    for path in ("/proc/device-tree/compatible", "/sys/firmware/devicetree/base/compatible"):
        text = _read_text(root, path)
        if text is None:
            continue
        for entry in text.split("\0"):
            match = _SOC_COMPATIBLE.match(entry.strip())
            if match:
                return re.sub(r"^(rk3588)s$", r"\1", match.group(1))
        return ""
    return ""


@dataclass(frozen=True)
class NpuState:
    node: str = ""       # the device node librkllmrt opens, "" when none
    driver: str = ""     # rknpu | rocket | ""
    group: str = ""      # group owning the node


def npu_state(root: str = "/") -> NpuState:
    """The vendor driver's /dev/rknpu, else a DRM render node driven by rknpu (vendor
    kernels built with RKNPU_DRM_GEM), else signs of the mainline rocket driver."""
    if os.path.exists(_at(root, "/dev/rknpu")):
        return NpuState("/dev/rknpu", "rknpu", _group_of(_at(root, "/dev/rknpu")))
    rocket = os.path.isdir(_at(root, "/sys/module/rocket"))
    for name in _listdir(root, "/sys/class/drm") + _listdir(root, "/sys/class/accel"):
        driver = _sysfs_driver(root, name)
        rocket = rocket or driver == "rocket"
        node = f"/dev/dri/{name}" if name.startswith("renderD") else ""
        if driver == "rknpu" and node and os.path.exists(_at(root, node)):
            return NpuState(node, "rknpu", _group_of(_at(root, node)))
    return NpuState("", "rocket" if rocket else "")


def _sysfs_driver(root: str, name: str) -> str:
    """The kernel driver behind /sys/class/{drm,accel}/<name>, lower case."""
    for cls in ("drm", "accel"):
        device = f"/sys/class/{cls}/{name}/device"
        uevent = _read_text(root, f"{device}/uevent") or ""
        match = re.search(r"^DRIVER=(\S+)", uevent, re.M)
        if match:
            return match.group(1).lower()
        link = _at(root, f"{device}/driver")
        if os.path.islink(link):
            return os.path.basename(os.readlink(link)).lower()
    return ""


def _group_of(path: str) -> str:
    try:
        import grp
        return grp.getgrgid(os.stat(path).st_gid).gr_name
    except (ImportError, KeyError, OSError):
        return ""


def driver_version(root: str = "/") -> str:
    """The rknpu driver's version ("0.9.8"), "" when no version file is readable."""
    for path in DRIVER_VERSION_FILES:
        found = _version_tuple(_read_text(root, path) or "")
        if found:
            return ".".join(map(str, found))
    return ""


def npu_load(root: str = "/") -> dict:
    """{core index: load percent} from the first readable load file, {} when none is."""
    for path in LOAD_FILES:
        text = _read_text(root, path)
        if text is None or "load" not in text.lower():
            continue
        cores = re.findall(r"Core\s*(\d+)\s*:\s*(\d+)\s*%", text)
        if cores:
            return {int(core): int(load) for core, load in cores}
        single = re.search(r":\s*(\d+)\s*%", text)
        if single:
            return {0: int(single.group(1))}
    return {}


def npu_frequency(root: str = "/") -> Optional[int]:
    """The NPU clock in Hz, None when no file says."""
    candidates = [f"{DEVFREQ_CLASS}/{name}/cur_freq" for name in _listdir(root, DEVFREQ_CLASS)
                  if "npu" in name.lower()]
    for path in candidates + list(FREQUENCY_FILES):
        match = re.search(r"\d+", _read_text(root, path) or "")
        if match:
            return int(match.group(0))
    return None


def cpu_features(root: str = "/") -> Optional[set]:
    """The CPU feature flags of /proc/cpuinfo (every core's), None when unreadable."""
    text = _read_text(root, "/proc/cpuinfo")
    if text is None:
        return None
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("features", "flags"):
            flags.update(value.split())
    return flags


def meminfo(root: str = "/") -> dict:
    """{"MemTotal": bytes, "MemAvailable": bytes, ...} from /proc/meminfo."""
    values = {}
    for line in (_read_text(root, "/proc/meminfo") or "").splitlines():
        match = re.match(r"^(\w+):\s+(\d+)\s*kB", line)
        if match:
            values[match.group(1)] = int(match.group(2)) * 1024
    return values


# ---------------------------------------------------------------- libraries

@dataclass(frozen=True)
class ElfHeader:
    bits: int          # 32 | 64
    machine: int       # e_machine: 183 aarch64, 62 x86-64...
    kind: int          # e_type: 3 = ET_DYN (shared object)

    @property
    def machine_name(self) -> str:
        return _ELF_MACHINES.get(self.machine, f"machine {self.machine}")


def read_elf_header(path: str) -> Optional[ElfHeader]:
    """The ELF identification of a file, None when it is not an ELF file."""
    with open(path, "rb") as handle:
        head = handle.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[4] not in (1, 2):
        return None
    order = "<" if head[5] == 1 else ">"
    kind, machine = struct.unpack(order + "HH", head[16:20])
    return ElfHeader(64 if head[4] == ELFCLASS64 else 32, machine, kind)


def aarch64_library_problem(path: str) -> Optional[str]:
    """Why the file at path is not an aarch64 shared library (None when it is)."""
    try:
        header = read_elf_header(path)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if header is None:
        return f"{path} is not an ELF file"
    if header.bits != 64 or header.machine != EM_AARCH64:
        return f"{path} is a {header.bits}-bit {header.machine_name} ELF file, not aarch64"
    if header.kind != ET_DYN:
        return f"{path} is an aarch64 ELF file but not a shared library (e_type {header.kind})"
    return None


def _binding():
    import rkllm_ctypes  # the NPU binding: its library search and version reading
    return rkllm_ctypes


def find_rkllm_library(settings, root: str = "/") -> tuple:
    """(path or "", [places looked at]): RKLLM_LIB_PATH as given, else the standard
    library folders under root, else (on the real root) the dynamic linker's search."""
    binding = _binding()
    if settings.rkllm_lib_path:
        try:
            return binding.find_library(settings.rkllm_lib_path), []
        except binding.RuntimeLoadError:
            return "", [settings.rkllm_lib_path]
    looked = []
    for folder in binding.STANDARD_LIBRARY_DIRS:
        candidate = os.path.join(folder, binding.LIBRARY_FILE)
        looked.append(candidate)
        if os.path.isfile(_at(root, candidate)):
            return _at(root, candidate), looked
    if os.path.abspath(root) == "/":
        try:
            return binding.find_library(""), looked
        except binding.RuntimeLoadError:
            looked.append("the dynamic linker's search path")
    return "", looked


def library_generation(path: str, configured_abi: str = "") -> tuple:
    """(versions found in the file, ABI chosen or "", problem or "") the way the
    server decides before its first call into the library."""
    binding = _binding()
    versions = binding.read_embedded_version(path).versions
    try:
        return versions, binding.choose_abi(path, configured_abi), ""
    except binding.RuntimeLoadError as exc:
        return versions, "", str(exc)


def find_rknn_library(settings, root: str = "/") -> str:
    """librknnrt.so (the vision encoders' runtime), "" when not installed."""
    folders = list(_binding().STANDARD_LIBRARY_DIRS)
    chosen = os.path.expanduser(getattr(settings, "rknn_lib_path", "") or "")
    if chosen:   # RKNN_LIB_PATH: the file, or its folder
        candidate = os.path.join(chosen, RKNN_LIBRARY_FILE) if os.path.isdir(chosen) else chosen
        return candidate if os.path.isfile(candidate) else ""
    beside = rknn_library(settings)   # installed side by side with a configured librkllmrt
    if beside:
        return beside
    for folder in folders:
        candidate = _at(root, os.path.join(folder, RKNN_LIBRARY_FILE))
        if os.path.isfile(candidate):
            return candidate
    return ""


def check_library_file(kind: str, path: str) -> int:
    """For setup.sh --runtime / --rknn: 0 (and a line on stdout) when the file is an
    aarch64 shared library of a known generation, else 1 and the reason on stderr."""
    problem = aarch64_library_problem(path)
    if problem is None and kind == "rkllm":
        versions, abi, problem = library_generation(path)
        if not problem:
            print(f"{path}: aarch64 shared library, librkllmrt {', '.join(versions)} (ABI {abi})")
    elif problem is None:
        with open(path, "rb") as handle:
            found = re.search(rb"librknnrt version:? ?v?(\d+\.\d+\.\d+)", handle.read())
        version = found.group(1).decode() if found else "version text not found"
        print(f"{path}: aarch64 shared library, librknnrt {version}")
    if problem:
        print(f"refusing {path}: {problem}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- model files

def model_platform(path: str, folder: str) -> str:
    """The platform an .rkllm file was built for, from its file name, else its folder
    name ("qwen3-1.7b_w8a8_rk3588.rkllm" -> "rk3588"); "" when neither says."""
    for name in (os.path.basename(path), os.path.basename(folder)):
        match = _PLATFORM.search(name)
        if match:
            return match.group(1).lower()
    return ""


# ---------------------------------------------------------------- the checks

def run_doctor(settings, root: str = "/", *, cpu_runtime: Optional[bool] = None,
               registry=None) -> Report:
    """Everything doctor knows about this machine and its models. cpu_runtime: whether
    llama-cpp-python is importable (None: look it up); registry: the server's own (None:
    a fresh one over settings)."""
    if registry is None:
        from rkllm_api.models.registry import Registry
        registry = Registry(settings)
    report = Report(root=root, models_root=settings.models_root_path, board=board_soc(root))
    models = registry.models()
    npu_findings = _npu_findings(settings, root, report)
    blocked_npu = [f for f in npu_findings if f.level == ERROR]
    if not any(m.device == "npu" for m in models):   # nothing depends on the NPU here
        npu_findings = [Finding(WARN, f.subject, f.message) if f.level == ERROR else f
                        for f in npu_findings]
    report.findings.extend(npu_findings)
    report.findings.append(_memory_finding(root, report))
    if cpu_runtime is None:
        cpu_runtime = importlib.util.find_spec("llama_cpp") is not None
    rknn = find_rknn_library(settings, root)
    for info in models:
        report.models.append(_check_model(info, report, bool(blocked_npu), cpu_runtime, rknn))
    if not models:
        report.findings.append(Finding(ERROR, "models", f"no models under {report.models_root} "
                                       "(and the bundled demo model is off or not installed)"))
    return report


def _npu_findings(settings, root: str, report: Report) -> list:
    """Board, device node, driver, librkllmrt and CPU findings; an ERROR here blocks
    every NPU model."""
    found = [Finding(INFO, "board", f"Rockchip {report.board} (device tree)" if report.board
                     else "not a Rockchip board (no rockchip SoC in the device tree)")]
    found.extend(_device_findings(root, report))
    found.extend(_library_findings(settings, root, report))
    return found


def _device_findings(root: str, report: Report) -> list:
    state = npu_state(root)
    report.npu_node, report.driver_version = state.node, driver_version(root)
    if state.driver == "rocket" and not state.node:
        return [Finding(ERROR, "npu",
                        "the mainline 'rocket' NPU driver is loaded and there is no /dev/rknpu: "
                        "librkllmrt (1.3.0 included) only talks to Rockchip's vendor rknpu driver "
                        "(airockchip/rknn-toolkit2 issue 570); boot a vendor (BSP) kernel for "
                        "NPU models")]
    if not state.node:
        return [Finding(ERROR, "npu", "no NPU device node (/dev/rknpu, or a DRM render node "
                        "of the rknpu driver): the rknpu driver is not loaded")]
    group = f", group {state.group}" if state.group else ""
    found = [Finding(OK, "npu", f"NPU device {state.node} (rknpu driver{group})")]
    version = _version_tuple(report.driver_version)
    if version is None:
        found.append(Finding(INFO, "driver", "rknpu driver version not readable (debugfs needs "
                             "root: run doctor as root to see it)"))
    elif version < OLDEST_DRIVER:
        found.append(Finding(WARN, "driver", f"rknpu driver {report.driver_version} is older "
                             "than 0.9.6: RKLLM runtimes are reported to fail on it; 0.9.8 is "
                             "what the SDK asks for"))
    else:
        level = OK if version >= RECOMMENDED_DRIVER else INFO
        advice = "" if level == OK else " (the RKLLM SDK asks for 0.9.8)"
        found.append(Finding(level, "driver", f"rknpu driver {report.driver_version}{advice}"))
    return found


def _library_findings(settings, root: str, report: Report) -> list:
    path, looked = find_rkllm_library(settings, root)
    if not path:
        return [Finding(ERROR, "librkllmrt", f"librkllmrt.so not found (looked at "
                        f"{', '.join(looked)}): install it with ./setup.sh --runtime FILE "
                        "or set RKLLM_LIB_PATH")]
    report.library_path = path
    problem = aarch64_library_problem(path) if report.board else None
    if problem:
        return [Finding(ERROR, "librkllmrt", f"{problem}: it cannot load on this board")]
    versions, abi, problem = library_generation(path, settings.rkllm_abi)
    report.library_versions, report.library_abi = tuple(versions), abi
    if problem:
        return [Finding(ERROR, "librkllmrt", problem)]
    shown = ", ".join(versions) or "version text not found"
    found = [Finding(OK, "librkllmrt", f"{path}: runtime {shown}, ABI {abi}")]
    if abi == "1.3" and (not versions or "1.3.0" in versions) and _is_aarch64(path):
        found.append(_sve_finding(root))   # (an x86 build, e.g. a test double, has no SVE issue)
    return found


def _is_aarch64(path: str) -> bool:
    try:
        header = read_elf_header(path)
    except OSError:
        return False
    return header is not None and header.machine == EM_AARCH64


def _sve_finding(root: str) -> Finding:
    features = cpu_features(root)
    if features is None:
        return Finding(INFO, "cpu", "cannot read /proc/cpuinfo to check for SVE, which "
                       "librkllmrt 1.3.0 needs")
    if "sve" in features:
        return Finding(OK, "cpu", "the CPU has SVE, which librkllmrt 1.3.0 needs")
    return Finding(ERROR, "cpu", "librkllmrt 1.3.0 uses SVE instructions and this CPU has "
                   "none (RK3588 and RK3576 cores lack SVE): it dies with 'Illegal "
                   "instruction' (airockchip/rknn-llm issue 518); install the 1.2.3 runtime")


def _memory_finding(root: str, report: Report) -> Finding:
    info = meminfo(root)
    report.mem_available, report.mem_total = info.get("MemAvailable"), info.get("MemTotal")
    if report.mem_available is None:
        return Finding(INFO, "memory", "cannot read MemAvailable from /proc/meminfo")
    return Finding(INFO, "memory", f"{_gib(report.mem_available)} available of "
                   f"{_gib(report.mem_total)}")


def _check_model(info, report: Report, npu_blocked: bool, cpu_runtime: bool,
                 rknn: str) -> ModelCheck:
    try:
        size = os.path.getsize(info.path)
    except OSError:
        size = 0
    check = ModelCheck(info.id, info.device, info.path, info.context_length, size)
    problems = check.problems
    if info.problem:   # the registry's verdict on the file: corrupt, truncated, empty
        problems.append(Finding(ERROR, "model", info.problem))
    if info.device == "npu":
        problems.extend(_npu_model_problems(info, report, npu_blocked, rknn))
    else:
        if not cpu_runtime:
            problems.append(Finding(ERROR, "model", "the CPU runtime (llama-cpp-python) is "
                                    "not installed: ./setup.sh installs it"))
    if report.mem_total and size > report.mem_total:
        problems.append(Finding(ERROR, "memory", f"the file alone ({_gib(size)}) is larger "
                                f"than the board's memory ({_gib(report.mem_total)})"))
    elif report.mem_available is not None and size > report.mem_available:
        problems.append(Finding(WARN, "memory", f"larger ({_gib(size)}) than the memory "
                                f"available now ({_gib(report.mem_available)}): loading may "
                                "fail unless memory is freed"))
    return check


def _npu_model_problems(info, report: Report, npu_blocked: bool, rknn: str) -> list:
    problems = []
    if npu_blocked:
        problems.append(Finding(ERROR, "npu", "the NPU runtime cannot run here (see above)"))
    target = model_platform(info.path, info.folder)
    if target and report.board and target != report.board:
        problems.append(Finding(ERROR, "model", f"built for {target}, this board is "
                                f"{report.board}: use the model converted for {report.board}"))
    if info.vision_encoder and not rknn:
        problems.append(Finding(WARN, "model", f"its vision encoder "
                                f"{os.path.basename(info.vision_encoder)} needs librknnrt.so, "
                                "which is not installed (./setup.sh --rknn FILE)"))
    return problems


# ---------------------------------------------------------------- output

_TAGS = {OK: "ok", INFO: "info", WARN: "WARN", ERROR: "ERROR"}


def render(report: Report) -> str:
    lines = [f"rkllm-api doctor{'' if report.root == '/' else f' (root {report.root})'}", ""]
    for finding in report.findings:
        lines.append(f"  {_TAGS[finding.level]:<6} {finding.subject:<11} {finding.message}")
    lines += ["", f"models ({report.models_root}):"]
    for model in report.models:
        state = "ok" if model.runnable else "CANNOT RUN"
        lines.append(f"  {model.id}: {model.device}, context {model.context_length}, "
                     f"{_gib(model.size_bytes)} - {state}")
        lines.append(f"      {model.path}")
        for problem in model.problems:
            lines.append(f"      {_TAGS[problem.level]:<6} {problem.message}")
    if not report.models:
        lines.append("  none")
    runnable = sum(m.runnable for m in report.models)
    lines += ["", f"{runnable} of {len(report.models)} models can run"
              + (": nothing can be served" if report.serving_blocked else "")]
    return "\n".join(lines) + "\n"


_LOG_LEVELS = {OK: logging.INFO, INFO: logging.INFO, WARN: logging.WARNING, ERROR: logging.ERROR}


def log_summary(report: Report, logger: logging.Logger) -> None:
    """The report in the server's log at startup, one line per finding and per model
    that cannot run. Never fatal: a machine without an NPU still serves CPU models."""
    for finding in report.findings:
        logger.log(_LOG_LEVELS[finding.level], "check %s: %s", finding.subject, finding.message)
    for model in report.models:
        for problem in model.problems:
            logger.log(_LOG_LEVELS[problem.level], "check model %s: %s", model.id, problem.message)
    runnable = [m.id for m in report.models if m.runnable]
    logger.log(logging.WARNING if report.serving_blocked else logging.INFO,
               "checks done: %d of %d models can run%s (rkllm-api doctor explains)",
               len(runnable), len(report.models),
               ": nothing can be served" if report.serving_blocked else "")


def main(argv=None) -> int:
    """`rkllm-api doctor`: prints the report; exit status 1 when no model can run."""
    from rkllm_api.config import Settings, SettingsError
    parser = argparse.ArgumentParser(prog="rkllm-api doctor", description=(
        "Checks the NPU driver, librkllmrt, the CPU and every model, and says what "
        "keeps a model from being served."))
    parser.add_argument("--models-root", help="models folder (default: RKLLM_MODELS_ROOT)")
    parser.add_argument("--root", help="prefix of /dev, /sys, /proc and the library "
                        "folders (a copy of another system's tree; default: RKLLM_SYSTEM_ROOT, /)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    # The registry and the binding log what they skip; the report says it better.
    logging.getLogger().setLevel(logging.ERROR)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"rkllm-api doctor: {exc}", file=sys.stderr)
        return 2
    if args.models_root:
        settings = settings.with_(models_root=args.models_root)
    report = run_doctor(settings, root=args.root or settings.system_root)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        sys.stdout.write(render(report))
    return report.exit_status()


if __name__ == "__main__":
    sys.exit(main())
