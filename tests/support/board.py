"""Fake system trees for the board checks: /dev, /sys and /proc files under a temporary
root, and librkllmrt files that hold an aarch64 ELF header and the version banner the
binding reads (doctor and the server's startup checks take such a root through
RKLLM_SYSTEM_ROOT / --root)."""
from __future__ import annotations

import os
import struct

GIB = 1 << 30
A76_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"


def aarch64_library(path, banner: bytes) -> str:
    """A file with a 64-bit little-endian aarch64 ET_DYN ELF header and a banner."""
    head = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8 + struct.pack("<HHI", 3, 183, 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(head.ljust(64, b"\0") + b"\0" + banner + b"\0" + b"\0" * 64)
    return str(path)


def write(root, path: str, content) -> str:
    target = os.path.join(str(root), path.lstrip("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as handle:
        handle.write(content if isinstance(content, bytes) else content.encode())
    return target


def make_board(root, *, soc="rk3588", node="rknpu", driver="0.9.8", runtime="1.2.3",
               sve=False, mem_total=8 * GIB, mem_available=6 * GIB):
    """A fake board's tree. node: "rknpu" (/dev/rknpu), "drm" (render node of the
    vendor driver), "rocket" (mainline driver) or None."""
    if soc:
        write(root, "/proc/device-tree/compatible", f"radxa,rock-5b\0rockchip,{soc}\0")
    if node == "rknpu":
        write(root, "/dev/rknpu", "")
    elif node in ("drm", "rocket"):
        write(root, "/dev/dri/renderD129", "")
        write(root, "/sys/class/drm/renderD129/device/uevent",
              f"DRIVER={'RKNPU' if node == 'drm' else 'rocket'}\nOF_NAME=npu\n")
        if node == "rocket":
            os.makedirs(os.path.join(str(root), "sys/module/rocket"))
    if driver:
        write(root, "/sys/kernel/debug/rknpu/version", f"RKNPU driver: v{driver}\n")
    if runtime:
        aarch64_library(os.path.join(str(root), "usr/lib/librkllmrt.so"),
                        f"rkllm-runtime version: {runtime}".encode())
    features = A76_FEATURES + (" sve" if sve else "")
    write(root, "/proc/cpuinfo", "".join(f"processor\t: {n}\nFeatures\t: {features}\n\n"
                                         for n in range(8)))
    write(root, "/proc/meminfo", f"MemTotal:       {mem_total // 1024} kB\n"
                                 f"MemFree:        1000 kB\nMemAvailable:   {mem_available // 1024} kB\n")
    return str(root)
