"""Compiling the librknnrt double (fake_rknnrt.c) with the system C compiler.

Plain functions (no pytest), like build.py for librkllmrt, so the test fixtures
(tests/support/rknn_double.py) and bench/vision_bench.py build it the same way.
"""
from __future__ import annotations

import os
import subprocess

from .build import DOUBLES_DIR, DoubleBuildError, compiler

RKNN_DOUBLE_SOURCE = os.path.join(DOUBLES_DIR, "fake_rknnrt.c")


def build_rknn_double(out_root: str) -> str:
    """Compile the double into <out_root>/rknn/librknnrt.so, named like the real
    library; returns its path. An up-to-date build is reused, so fixtures in several
    test modules share one compilation per session."""
    folder = os.path.join(out_root, "rknn")
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, "librknnrt.so")
    if (os.path.isfile(target)
            and os.path.getmtime(target) >= os.path.getmtime(RKNN_DOUBLE_SOURCE)):
        return target
    partial = target + f".{os.getpid()}.tmp"  # never leave a half-written library behind
    command = [compiler(), "-shared", "-fPIC", "-O2", "-std=gnu11", "-pthread",
               "-Wall", "-Wextra", "-Werror",
               # a SONAME like the real library's, which ctypes.util.find_library
               # needs to report a library it found through LD_LIBRARY_PATH
               "-Wl,-soname,librknnrt.so", "-o", partial, RKNN_DOUBLE_SOURCE]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise DoubleBuildError(f"building the librknnrt double failed:\n{' '.join(command)}\n"
                               f"{done.stdout}{done.stderr}")
    os.replace(partial, target)
    return target
