"""Small LoRA adapters for the bundled SmolLM2, written with the `gguf` package.

llama.cpp's LoRA GGUF: general.architecture of the base model, general.type
"adapter", adapter.type "lora", adapter.lora.alpha, and for each adapted weight W
(ggml shape [n_in, n_out]) two tensors: `<W>.lora_a` of ggml shape [n_in, rank] and
`<W>.lora_b` of ggml shape [rank, n_out] (numpy shapes are the reverse). The
adapted weight is W + scale * alpha / rank * B·A.

The tensors are seeded random low-rank matrices: nothing is trained, but a big
enough delta on the attention projections changes what the model says, which is all
the tests need. The shapes are read from the base model's own tensor table.
"""
from __future__ import annotations

import os
import shutil

import pytest

ADAPTED = ("attn_q", "attn_v")
RANK = 8


def base_shapes(base_model_path: str) -> dict:
    """{tensor name: (n_in, n_out)} of the weights an adapter changes, and the
    architecture name."""
    gguf = pytest.importorskip("gguf", reason="the gguf package is a test dependency")
    reader = gguf.GGUFReader(base_model_path)
    field = reader.fields["general.architecture"]
    architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
    shapes = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in ADAPTED:
            shapes[tensor.name] = (int(tensor.shape[0]), int(tensor.shape[1]))
    return {"architecture": architecture, "tensors": shapes}


def write_lora_gguf(path: str, shapes: dict, *, seed: int, sigma: float = 0.12,
                    alpha: float = float(RANK)) -> str:
    """Write a LoRA adapter for the model `shapes` describes (see base_shapes)."""
    import gguf
    import numpy

    rng = numpy.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch=shapes["architecture"])
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for name, (n_in, n_out) in sorted(shapes["tensors"].items()):
        lora_a = rng.normal(0.0, sigma, size=(RANK, n_in)).astype(numpy.float32)
        lora_b = rng.normal(0.0, sigma, size=(n_out, RANK)).astype(numpy.float32)
        writer.add_tensor(f"{name}.lora_a", lora_a)
        writer.add_tensor(f"{name}.lora_b", lora_b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def smollm_lora_files(smollm_path, tmp_path_factory) -> dict:
    """Two different adapters for SmolLM2: {"pirate": path, "poet": path}."""
    shapes = base_shapes(smollm_path)
    folder = tmp_path_factory.mktemp("lora")
    return {name: write_lora_gguf(str(folder / f"{name}.gguf"), shapes, seed=seed)
            for name, seed in (("pirate", 11), ("poet", 23))}


def make_model_with_adapters(models_root, smollm_path: str, lora_files: dict,
                             name: str = "smol") -> str:
    """A model folder `name` under models_root holding SmolLM2 (a symlink) and the
    adapters in its lora/ folder; returns the folder."""
    folder = os.path.join(str(models_root), name)
    os.makedirs(os.path.join(folder, "lora"), exist_ok=True)
    link = os.path.join(folder, os.path.basename(smollm_path))
    if not os.path.exists(link):
        os.symlink(smollm_path, link)
    for adapter, path in lora_files.items():
        shutil.copyfile(path, os.path.join(folder, "lora", f"{adapter}.gguf"))
    return folder
