"""Vision path cost on the CPU: image preprocessing, and the encoder call through ctypes.

Preprocessing: a photo-like image of 0.3, 2 and 12 megapixels, sent as a base64 data
URL (what Open WebUI sends), turned into a 448 x 448 encoder input by
rkllm_api.vision: base64, decode, EXIF, pad, resize, layout. Two encoder kinds: a
quantised one (uint8 NHWC, no normalisation) and a float one (float32 NCHW, CLIP
mean/std). Median of --repeats runs.

Encoder path: RknnEncoder.encode() on the compiled librknnrt double. With a 2 x 2
input and a 1 x 3 output the double does nothing, so the time is the binding's own
overhead (four ctypes calls, the input struct, the output copy). With a 448 x 448
input and a 256 x 1536 output it adds the double's pass over the pixels and the
1.5 MB output copy. Both in this process and through a child process (the server's
default, RUNTIME_ISOLATION: the image goes in and the rows come back over a socket).
A real NPU takes hundreds of milliseconds per image, so all must stay far below that.

Handoff: RKLLMRuntime.run() with 0, 1 and 4 images' rows on the librkllmrt double,
in process and through a runtime child process: what passing the embeddings costs.

    .venv/bin/python bench/vision_bench.py [--repeats 7] [--calls 2000]
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from doubles.build_rknn import build_rknn_double  # noqa: E402
from rkllm_api import vision  # noqa: E402
from rknn_ctypes import RknnEncoder  # noqa: E402

SIZES = {"0.3 MP": (640, 480), "2 MP": (1632, 1224), "12 MP": (4000, 3000)}
TARGETS = {"uint8 NHWC": vision.EncoderInput(448, 448, 3, "NHWC", "uint8"),
           "float32 NCHW": vision.EncoderInput(448, 448, 3, "NCHW", "float32")}


def photo(width: int, height: int):
    """Smooth gradients with fine noise: compresses like a photo, unlike flat colour
    (too easy) or pure noise (too hard)."""
    import numpy
    from PIL import Image
    rng = numpy.random.default_rng(0)
    y, x = numpy.mgrid[0:height, 0:width].astype(numpy.float32)
    base = numpy.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1)
    noisy = base + rng.normal(0, 12, base.shape).astype(numpy.float32)
    return Image.fromarray(numpy.clip(noisy, 0, 255).astype(numpy.uint8))


def as_data_url(image, fmt: str) -> str:
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(out.getvalue()).decode()


def median_ms(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000.0


def preprocessing_table(repeats: int) -> list:
    norm = vision.normalisation_for("qwen2-vl")
    limits = vision.ImageLimits(max_bytes=64 * 1024 * 1024)
    rows = []
    for label, (width, height) in SIZES.items():
        image = photo(width, height)
        for fmt in ("JPEG", "PNG"):
            url = as_data_url(image, fmt)
            row = [label, fmt, f"{len(url) * 3 // 4 / 1e6:.2f} MB"]
            for spec in TARGETS.values():
                row.append(median_ms(lambda: vision.preprocess_all([url], spec, norm, limits),
                                     repeats))
            rows.append(row)
    return rows


def encoder_table(work_dir: str, calls: int) -> list:
    """encode() on the librknnrt double: RknnEncoder in this process, and the encoder
    in a child process (RUNTIME_ISOLATION: image in and rows out cross a socket)."""
    import numpy
    from rkllm_api.config import Settings
    from rkllm_api.runtimes.isolation import IsolatedRuntimes
    library = build_rknn_double(work_dir)
    settings = Settings(rknn_lib_path=library)
    isolated = IsolatedRuntimes()
    openers = (("in process", lambda model: RknnEncoder(model, lib_path=library)),
               ("child process", lambda model: isolated(model, context_length=0,
                                                        settings=settings)))
    rows = []
    for label, header in (("2x2 in, 1x3 out (overhead only)", "h=2 w=2 c=3 out=1x3"),
                          ("448x448 in, 256x1536 out", "h=448 w=448 c=3 out=256x1536")):
        model = os.path.join(work_dir, "bench.rknn")
        with open(model, "w", encoding="ascii") as handle:
            handle.write(f"FAKE-RKNN {header} layout=NHWC type=uint8\n")
        for where, open_encoder in openers:
            encoder = open_encoder(model)
            try:
                pixels = numpy.zeros(encoder.input_spec.shape, numpy.uint8)
                count = calls if "overhead" in label else max(1, calls // 20)
                encoder.encode(pixels)  # warm up
                started = time.perf_counter()
                for _ in range(count):
                    encoder.encode(pixels)
                rows.append((f"{label}, {where}", count,
                             (time.perf_counter() - started) / count * 1e6))
            finally:
                encoder.close()
    return rows


def handoff_table(work_dir: str, repeats: int) -> list:
    """RKLLMRuntime.run() on the librkllmrt double (ABI 1.3) with 0, 1 and 4 images of
    256 x 1536 rows (a Qwen2-VL-2B image at 448 x 448), one answer token: in this
    process, and through a child process (RUNTIME_ISOLATION, where every run's
    images are pickled across a socket)."""
    import numpy
    from doubles.build import build_rkllm_double
    from rkllm_api.config import Settings
    from rkllm_api.runtimes.base import IMAGE_MARKER, ImageEmbedding, ImageTags, RunRequest
    from rkllm_api.runtimes.factory import open_runtime
    from rkllm_api.runtimes.isolation import IsolatedRuntimes
    library = build_rkllm_double("1.3", work_dir)
    model = os.path.join(work_dir, "bench-vl.rkllm")
    with open(model, "wb") as handle:
        handle.write(b"FAKE-RKLLM-MODEL\n")
    settings = Settings(rkllm_lib_path=library, rkllm_abi="1.3")
    tags = ImageTags("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
    rows = []
    for where, factory in (("in process", open_runtime), ("child process", IsolatedRuntimes())):
        runtime = factory(model, context_length=4096, settings=settings, image_tags=tags)
        try:
            for count in (0, 1, 4):
                images = tuple(ImageEmbedding(numpy.full((256, 1536), 0.5, numpy.float32),
                                              str(i), 448, 448) for i in range(count))
                request = RunRequest(prompt=IMAGE_MARKER * count + "Hi @@count:1@@",
                                     images=images, max_new_tokens=1)
                runtime.run(request, lambda event: None)  # warm up
                rows.append((where, count, median_ms(
                    lambda: runtime.run(request, lambda event: None), repeats * 3)))
        finally:
            runtime.close()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs per preprocessing figure")
    parser.add_argument("--calls", type=int, default=2000, help="encode() calls (overhead)")
    args = parser.parse_args(argv)
    print("Preprocessing a data URL to a 448x448 encoder input (median ms):")
    print(f"{'image':8} {'format':6} {'size':>9} " + " ".join(f"{t:>14}" for t in TARGETS))
    for label, fmt, size, *ms in preprocessing_table(args.repeats):
        print(f"{label:8} {fmt:6} {size:>9} " + " ".join(f"{m:14.1f}" for m in ms))
    with tempfile.TemporaryDirectory(prefix="vision-bench-") as work_dir:
        print("\nencode() on the librknnrt double (mean per call):")
        for label, count, us in encoder_table(work_dir, args.calls):
            print(f"  {label:50} {count:6} calls  {us:9.1f} us/call")
        print("\nA run with images on the librkllmrt double, 1 token (median ms):")
        for where, count, ms in handoff_table(work_dir, args.repeats):
            print(f"  {where:14} {count} images  {ms:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
