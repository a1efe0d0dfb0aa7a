"""setup.sh run for real against a temporary --root tree (never against this system:
every call passes --root and --skip-venv), the units it writes checked with
systemd-analyze, the env file read back into Settings, and the governor script run
against a fake sysfs."""
from __future__ import annotations

import dataclasses
import grp
import os
import shutil
import stat
import struct
import subprocess

import pytest

from rkllm_api import envfile
from rkllm_api.config import Settings
from rkllm_api.gunicorn_settings import options as gunicorn_options
from rkllm_api.security import KeyRing, parse_keys_file

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(CHECKOUT, "setup.sh")
GOVERNOR_SCRIPT = os.path.join(CHECKOUT, "deploy", "rkllm-api-governor.sh")
UNIT = "etc/systemd/system/rkllm-api.service"
GOVERNOR_UNIT = "etc/systemd/system/rkllm-api-governor.service"
ENV_FILE = "etc/rkllm-api/rkllm-api.env"
KEYS_FILE = "etc/rkllm-api/keys"
WEBUI_ENV_FILE = "etc/rkllm-api/open-webui.env"
MODELS = "var/lib/rkllm-api/models"
TIMEOUT = 120


def run_setup(root, *args, check=True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}
    done = subprocess.run(["bash", SETUP, "--root", str(root), "--skip-venv", *args],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def snapshot(root) -> dict:
    """{relative path: (file type and mode, bytes or link target)} of a whole tree."""
    tree = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    content = handle.read()
            else:
                content = None
            tree[os.path.relpath(path, root)] = (info.st_mode, content)
    return tree


def fake_aarch64_library(path, banner: bytes) -> str:
    head = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8 + struct.pack("<HHI", 3, 183, 1)
    with open(path, "wb") as handle:
        handle.write(head.ljust(64, b"\0") + b"\0" + banner + b"\0")
    return str(path)


def npu_group():
    """A group other than root this process may give a file, or None."""
    for gid in sorted(set(os.getgroups()) | ({g.gr_gid for g in grp.getgrall()}
                                             if os.geteuid() == 0 else set())):
        if gid != 0:
            try:
                return grp.getgrgid(gid).gr_name
            except KeyError:
                continue
    return None


@pytest.fixture
def board(tmp_path):
    """A --root tree with an NPU render node, and the runtime libraries to install."""
    root = tmp_path / "root"
    node = root / "dev" / "dri" / "renderD129"
    node.parent.mkdir(parents=True)
    node.write_bytes(b"")
    group = npu_group()
    if group:
        os.chown(node, -1, grp.getgrnam(group).gr_gid)
    libs = tmp_path / "libs"
    libs.mkdir()
    return {"root": root, "group": group,
            "rkllm": fake_aarch64_library(libs / "librkllmrt.so", b"rkllm-runtime version: 1.2.3"),
            "rknn": fake_aarch64_library(libs / "librknnrt.so", b"librknnrt version: 2.3.2")}


def full_install(board, *extra):
    return run_setup(board["root"], "--service", "--governor", "--runtime", board["rkllm"],
                     "--rknn", board["rknn"], *extra)


def read(root, path) -> str:
    with open(os.path.join(str(root), path), encoding="utf-8") as handle:
        return handle.read()


# ------------------------------------------------------------------ idempotence

def test_two_runs_leave_the_tree_identical(board):
    root = board["root"]
    first = full_install(board)
    tree = snapshot(root)
    second = full_install(board)
    assert snapshot(root) == tree
    assert "written" in first.stdout
    assert "written" not in second.stdout and "created" not in second.stdout
    assert "unchanged" in second.stdout and "kept as it is" in second.stdout
    for path in (UNIT, GOVERNOR_UNIT, ENV_FILE, "usr/lib/librkllmrt.so", "usr/lib/librknnrt.so",
                 "usr/local/sbin/rkllm-api-governor", "etc/systemd/system/multi-user.target.wants/rkllm-api.service"):
        assert path in tree, path
    assert stat.S_IMODE(tree["usr/local/sbin/rkllm-api-governor"][0]) == 0o755
    assert stat.S_IMODE(tree["var/cache/rkllm-api"][0]) == 0o700


def test_service_user_and_npu_group(board):
    full_install(board)
    passwd = read(board["root"], "etc/passwd").splitlines()
    [user] = [line.split(":") for line in passwd if line.startswith("rkllm-api:")]
    assert user[5] == "/var/lib/rkllm-api" and user[6].endswith(("nologin", "false"))
    assert 100 <= int(user[2]) < 1000          # a system user
    if board["group"]:
        groups = read(board["root"], "etc/group").splitlines()
        [line] = [g for g in groups if g.startswith(board["group"] + ":")]
        assert "rkllm-api" in line.split(":")[3].split(",")


# ------------------------------------------------------------------ the units

def unit_values(text: str) -> dict:
    values = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_unit_settings(board):
    full_install(board)
    unit = unit_values(read(board["root"], UNIT))
    assert unit["ExecStart"] == [f"{CHECKOUT}/.venv/bin/rkllm-api"]
    assert unit["EnvironmentFile"] == ["/" + ENV_FILE]
    assert unit["User"] == ["rkllm-api"] and unit["Restart"] == ["on-failure"]
    assert int(unit["TimeoutStopSec"][0]) > gunicorn_options(Settings())["graceful_timeout"]
    assert unit["StandardOutput"] == unit["StandardError"] == ["journal"]
    for key in ("NoNewPrivileges", "PrivateTmp"):
        assert unit[key] == ["yes"], key
    assert unit["ProtectSystem"] == ["strict"]
    writable = unit["ReadWritePaths"][0].split()
    assert writable == ["-/" + MODELS, "/var/cache/rkllm-api", "/var/lib/rkllm-api"]
    in_home = CHECKOUT.startswith(("/home/", "/root/"))
    assert unit["ProtectHome"] == ["read-only" if in_home else "yes"]


def test_models_under_home_keep_home_readable(tmp_path):
    root = tmp_path / "root"
    run_setup(root, "--service", "--models-root", "/home/pi/models")
    unit = unit_values(read(root, UNIT))
    assert unit["ProtectHome"] == ["read-only"]
    assert "-/home/pi/models" in unit["ReadWritePaths"][0].split()
    assert os.path.isdir(root / "home/pi/models")
    assert envfile.parse(read(root, ENV_FILE))["RKLLM_MODELS_ROOT"] == "/home/pi/models"


def test_units_pass_systemd_analyze_verify(board, tmp_path):
    """verify --root looks for ExecStart binaries and the standard targets inside the
    root: a copy of the tree gets the system's unit folder and a stub for the venv's
    rkllm-api (the real tree stays as setup.sh left it)."""
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze missing: ./setup.sh --test installs it (package systemd)")
    full_install(board)
    verify_root = tmp_path / "verify"
    shutil.copytree(board["root"], verify_root, symlinks=True)
    units = next(p for p in ("/usr/lib/systemd/system", "/lib/systemd/system") if os.path.isdir(p))
    shutil.copytree(units, verify_root / "usr/lib/systemd/system", symlinks=True)
    stub = verify_root / CHECKOUT.lstrip("/") / ".venv/bin/rkllm-api"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    for unit in (UNIT, GOVERNOR_UNIT):
        done = subprocess.run([analyze, "verify", f"--root={verify_root}", "/" + unit],
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "rkllm-api" not in done.stdout + done.stderr, done.stdout + done.stderr


# ------------------------------------------------------------------ the env file

def test_env_file_lists_every_setting_with_its_default(board):
    full_install(board)
    text = read(board["root"], ENV_FILE)
    commented = envfile.parse(text, commented=True)
    names = {envfile.env_name(f) for f in dataclasses.fields(Settings)}
    assert set(commented) == names
    assert Settings.from_env(commented) == Settings()
    active = Settings.from_env(envfile.parse(text))
    assert active.host == "0.0.0.0"
    assert active.models_root == "/" + MODELS
    assert active.kv_cache_dir == "/var/cache/rkllm-api"
    assert active.log_file == ""          # journald only
    assert active.api_keys_file == "/" + KEYS_FILE
    assert envfile.is_pristine(text)


def test_the_service_starts_with_keys_only_it_and_root_read(board):
    """The service listens on 0.0.0.0: it must not start open to the LAN. An admin key
    for the owner, one for Open WebUI (also in the env file docker compose reads)."""
    full_install(board)
    path, webui = board["root"] / KEYS_FILE, board["root"] / WEBUI_ENV_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE(webui.stat().st_mode) == 0o600
    keys = parse_keys_file(path.read_text())
    assert [(name, admin) for _, name, admin in keys] == [("owner", True), ("open-webui", False)]
    assert all(len(key) >= 32 for key, _, _ in keys) and keys[0][0] != keys[1][0]
    assert envfile.parse(webui.read_text()) == {"OPEN_WEBUI_API_KEY": keys[1][0]}
    text = read(board["root"], ENV_FILE)
    settings = Settings.from_env({**envfile.parse(text),
                                  "RKLLM_API_KEYS_FILE": str(path)})   # the tree's path
    ring = KeyRing.from_settings(settings)
    assert ring.enabled and ring.match(keys[0][0]).admin and not ring.match(keys[1][0]).admin
    assert ring.match("wrong-key-0123456789") is None
    other = tmp_root_install(board)
    assert parse_keys_file((other / KEYS_FILE).read_text())[0][0] != keys[0][0]   # made here
    full_install(board)
    assert parse_keys_file(path.read_text()) == keys                  # kept, not remade
    run_setup(board["root"], "--uninstall")
    assert parse_keys_file(path.read_text()) == keys                  # clients still use them
    assert webui.exists()


def tmp_root_install(board):
    root = board["root"].parent / "other-root"
    run_setup(root, "--service")
    return root


def test_env_file_descriptions_come_from_config(board):
    full_install(board)
    text = read(board["root"], ENV_FILE)
    assert "# 0 = all cores\n#CPU_THREADS=0\n" in text
    assert "# ---------------- rag" in text


def test_edited_env_file_is_kept(board):
    full_install(board)
    path = board["root"] / ENV_FILE
    path.write_text(path.read_text() + "RKLLM_API_PORT=9000\n")
    edited = path.read_text()
    full_install(board)
    assert path.read_text() == edited
    assert not envfile.is_pristine(edited)
    done = run_setup(board["root"], "--uninstall")
    assert path.read_text() == edited and "kept (edited" in done.stdout


def test_envfile_refuses_unknown_names_and_bad_values():
    with pytest.raises(ValueError, match="NOT_A_SETTING"):
        envfile.render({"NOT_A_SETTING": "1"})
    with pytest.raises(ValueError):
        envfile.render({"RKLLM_API_PORT": "eighty"})
    assert envfile.parse(envfile.render({"RKLLM_MODELS_ROOT": "/a b"}))["RKLLM_MODELS_ROOT"] == "/a b"


# ------------------------------------------------------------------ runtime libraries

def test_runtime_refuses_an_x86_library(tmp_path, rkllm_double_libs):
    root = tmp_path / "root"
    done = run_setup(root, "--runtime", rkllm_double_libs["1.2"], check=False)
    assert done.returncode != 0
    assert "x86-64" in done.stderr and "not aarch64" in done.stderr
    assert not (root / "usr/lib/librkllmrt.so").exists()


def test_runtime_refuses_an_unknown_generation(tmp_path):
    library = fake_aarch64_library(tmp_path / "librkllmrt.so", b"rkllm-runtime version: 1.4.0")
    done = run_setup(tmp_path / "root", "--runtime", library, check=False)
    assert done.returncode != 0 and "1.4.0" in done.stderr
    assert not (tmp_path / "root/usr/lib/librkllmrt.so").exists()


def test_runtime_accepts_an_aarch64_library(board):
    done = run_setup(board["root"], "--runtime", board["rkllm"])
    installed = board["root"] / "usr/lib/librkllmrt.so"
    with open(board["rkllm"], "rb") as original:
        assert installed.read_bytes() == original.read()
    assert "1.2.3 (ABI 1.2)" in done.stdout and "ldconfig: skipped" in done.stdout


def test_runtime_replaces_the_copy_in_the_multiarch_folder(board):
    existing = board["root"] / "usr/lib/aarch64-linux-gnu/librkllmrt.so"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"old")
    run_setup(board["root"], "--runtime", board["rkllm"])
    assert existing.read_bytes() != b"old"
    assert not (board["root"] / "usr/lib/librkllmrt.so").exists()


# ------------------------------------------------------------------ uninstall

def test_uninstall_leaves_models_and_caches(board):
    root = board["root"]
    full_install(board)
    model = root / MODELS / "qwen" / "qwen.rkllm"
    model.parent.mkdir()
    model.write_bytes(b"weights")
    done = run_setup(root, "--uninstall")
    for path in (UNIT, GOVERNOR_UNIT, ENV_FILE, "usr/local/sbin/rkllm-api-governor",
                 "etc/systemd/system/multi-user.target.wants/rkllm-api.service"):
        assert not os.path.lexists(root / path), path
    assert "rkllm-api" not in read(root, "etc/passwd") + read(root, "etc/group")
    assert model.read_bytes() == b"weights"
    assert (root / "var/cache/rkllm-api").is_dir()
    assert (root / "usr/lib/librkllmrt.so").exists()    # may serve other programs
    assert "removed (unedited)" in done.stdout
    again = run_setup(root, "--uninstall")
    assert "not installed" in again.stdout and "not present" in again.stdout


def test_unknown_option_fails(tmp_path):
    done = run_setup(tmp_path / "root", "--frobnicate", check=False)
    assert done.returncode != 0 and "unknown option" in done.stderr


# ------------------------------------------------------------------ governor script

def test_governor_script_sets_and_restores(tmp_path):
    sysfs = tmp_path / "sys"
    npu = sysfs / "class/devfreq/fdab0000.npu"
    cpu = sysfs / "devices/system/cpu/cpufreq/policy0"
    for folder, name, accepted, current in (
            (npu, "governor", "rknpu_ondemand userspace performance", "rknpu_ondemand"),
            (cpu, "scaling_governor", "ondemand performance schedutil", "schedutil")):
        folder.mkdir(parents=True)
        (folder / name).write_text(current + "\n")
        (folder / ("available_governors" if name == "governor"
                   else "scaling_available_governors")).write_text(accepted + "\n")
    env = dict(os.environ, RKLLM_GOVERNOR_SYSFS=str(sysfs),
               RKLLM_GOVERNOR_SAVED=str(tmp_path / "saved"))

    def run(action):
        done = subprocess.run(["sh", GOVERNOR_SCRIPT, action], env=env, capture_output=True,
                              text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr

    run("start")
    run("start")   # a restart keeps the first saved state
    assert (npu / "governor").read_text().strip() == "performance"
    assert (cpu / "scaling_governor").read_text().strip() == "performance"
    run("stop")
    assert (npu / "governor").read_text().strip() == "rknpu_ondemand"
    assert (cpu / "scaling_governor").read_text().strip() == "schedutil"
