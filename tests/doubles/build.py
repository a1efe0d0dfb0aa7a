"""Compiling the librkllmrt double with the system C compiler.

Plain functions (no pytest) so both the test fixtures (tests/support/doubles.py)
and the benchmarks (bench/) can build the double the same way.
"""
from __future__ import annotations

import os
import shutil
import subprocess

DOUBLES_DIR = os.path.dirname(os.path.abspath(__file__))
RKLLM_DOUBLE_SOURCE = os.path.join(DOUBLES_DIR, "fake_rkllmrt.c")
RKLLM_DOUBLE_ABIS = ("1.2", "1.3")
RKLLM_DOUBLE_VERSIONS = {"1.2": "1.2.3", "1.3": "1.3.0"}
# Width of the hidden layer the double returns in embedding mode.
RKLLM_DOUBLE_HIDDEN_WIDTH = 64


class DoubleBuildError(RuntimeError):
    pass


def compiler() -> str:
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not found:
        raise DoubleBuildError("no C compiler (cc/gcc) on PATH: the C doubles cannot be built")
    return found


def build_rkllm_double(abi: str, out_root: str) -> str:
    """Compile the double for one ABI generation ("1.2" or "1.3") into
    <out_root>/abi-<abi>/librkllmrt.so, named like the real library; returns its path."""
    if abi not in RKLLM_DOUBLE_ABIS:
        raise ValueError(f"unknown ABI {abi!r}; the double speaks {RKLLM_DOUBLE_ABIS}")
    folder = os.path.join(out_root, f"abi-{abi}")
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, "librkllmrt.so")
    minor = abi.split(".")[1]
    command = [compiler(), "-shared", "-fPIC", "-O2", "-std=gnu11", "-pthread",
               "-Wall", "-Werror", f"-DFAKE_ABI_MINOR={minor}",
               "-o", target, RKLLM_DOUBLE_SOURCE]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise DoubleBuildError(f"building the librkllmrt double failed:\n{' '.join(command)}\n"
                               f"{done.stdout}{done.stderr}")
    return target
