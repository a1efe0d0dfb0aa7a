"""Fixtures for the C double of librknnrt (tests/doubles/fake_rknnrt.c).

The double is compiled once per test session into <basetemp>/rknn-double/rknn/
librknnrt.so. A fake .rknn model is a text file whose first line sets the encoder's
input and output (see the double's header comment); make_fake_rknn_model writes one.
"""
from __future__ import annotations

import json
import os

import pytest

from doubles.build import DoubleBuildError
from doubles.build_rknn import build_rknn_double


def fake_rknn_header(h: int = 448, w: int = 448, c: int = 3, layout: str = "NHWC",
                     type: str = "uint8", out: str = "256x64", **directives) -> str:
    """The double's model line, e.g. FAKE-RKNN h=448 ... out=256x64 fail=run:-3."""
    words = [f"h={h}", f"w={w}", f"c={c}", f"layout={layout}", f"type={type}", f"out={out}"]
    words += [f"{key}={value}" for key, value in directives.items()]
    return "FAKE-RKNN " + " ".join(words)


def make_fake_rknn_model(folder, name: str = "vision", **attributes) -> str:
    """Writes <folder>/<name>.rknn for the double; attributes as fake_rknn_header."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), f"{name}.rknn")
    with open(path, "w", encoding="ascii") as handle:
        # the padding makes the file look like a model, not just its header
        handle.write(fake_rknn_header(**attributes) + "\n" + "\0" * 64)
    return path


class RknnRecord:
    """The calls the double recorded in FAKE_RKNN_RECORD for this test."""

    def __init__(self, path: str):
        self.path = path

    def entries(self, call: str | None = None) -> list:
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as handle:
            lines = [json.loads(line) for line in handle if line.strip()]
        return [e for e in lines if call is None or e["call"] == call]

    def calls(self) -> list:
        return [e["call"] for e in self.entries()]

    def last(self, call: str) -> dict:
        found = self.entries(call)
        assert found, f"the double recorded no {call!r} call"
        return found[-1]


@pytest.fixture(scope="session")
def rknn_double_lib(tmp_path_factory) -> str:
    """Path of the compiled librknnrt double."""
    root = str(tmp_path_factory.getbasetemp() / "rknn-double")
    try:
        return build_rknn_double(root)
    except DoubleBuildError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def rknn_record(tmp_path, monkeypatch) -> RknnRecord:
    """Turns the double's call record on for this test (FAKE_RKNN_RECORD)."""
    path = str(tmp_path / "rknn-record.jsonl")
    monkeypatch.setenv("FAKE_RKNN_RECORD", path)
    monkeypatch.delenv("FAKE_RKNN_FAIL", raising=False)
    return RknnRecord(path)


__all__ = ["fake_rknn_header", "make_fake_rknn_model", "RknnRecord", "rknn_double_lib",
           "rknn_record"]
