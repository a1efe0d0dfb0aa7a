"""Embedding throughput on the bundled SmolLM2 (CPU runtime), in texts per second.

Prints, side by side in one run, for batch sizes 1, 8 and 32 (texts per request):
  - engine:  Engine.embed() in this process (hidden states, pooling, normalisation)
  - http:    POST /v1/embeddings to a real gunicorn on 127.0.0.1 (float format),
             which adds parsing, the JSON answer and the round trip
  - packed:  for reference, the same texts decoded by llama.cpp several sequences
             per llama_decode call (what the runtime does NOT do: it decodes each
             text alone, so a vector never depends on its batch); rows copied out,
             no pooling
and the ratios: each batch size against batch size 1 (within a column), and the
runtime's one-text-per-decode against packed decoding (same process). The http and
engine columns come from different processes: the server runs in a session of its
own, and Linux's autogroup scheduler gives it another CPU share than this process on
a busy machine, so compare within a column, not across.

Texts are 32 passages of 60-120 words (about 90-180 tokens), the size of the chunks
Open WebUI embeds. Every figure is the median of --runs passes over all texts; the
variants take turns pass by pass, so a change in the machine's load hits them alike.

    .venv/bin/python bench/embed_bench.py [--texts 32] [--runs 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from rkllm_api.config import Settings  # noqa: E402
from rkllm_api.engine.manager import Engine  # noqa: E402
from rkllm_api.models.registry import Registry  # noqa: E402
from support.live_server import LiveServers, start_cpu_server  # noqa: E402

MODEL = "smollm2-135m-instruct"
BATCH_SIZES = (1, 8, 32)
WORDS = ("the tower river engine market council garden winter station report museum "
         "harbour bridge ministry festival village library quarter season figure budget "
         "was is has had built opened rose fell grew closed moved reached measured "
         "in on of for with after before during near across under above between").split()


def passages(count: int, seed: int = 7) -> list:
    rng = random.Random(seed)
    texts = []
    for index in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(60, 120))]
        texts.append(f"Passage {index}: " + " ".join(words).capitalize() + ".")
    return texts


def batches(texts: list, size: int) -> list:
    return [texts[i:i + size] for i in range(0, len(texts), size)]


def seconds_of(one_pass) -> float:
    started = time.perf_counter()
    one_pass()
    return time.perf_counter() - started


def embed_engine(texts: list, threads: int, work: str) -> Engine:
    os.makedirs(os.path.join(work, "models"), exist_ok=True)   # empty: the bundled model only
    settings = Settings(models_root=os.path.join(work, "models"), cpu_threads=threads,
                        idle_unload_seconds=0, kv_cache_dir=os.path.join(work, "kv"))
    engine = Engine(settings, Registry(settings))
    engine.start()
    engine.embed(MODEL, texts[:2])   # load the model and the embedding context
    return engine


def http_poster(server):
    session = requests.Session()

    def post(group):
        response = session.post(server.url + "/v1/embeddings", timeout=600,
                                json={"model": MODEL, "input": group,
                                      "encoding_format": "float"})
        response.raise_for_status()
        assert len(response.json()["data"]) == len(group)
    return post


def packed_pass(runtime, texts: list, per_decode: int = 8):
    """llama.cpp decoding `per_decode` sequences per call on the runtime's own
    embedding context: the alternative to one text per decode."""
    import llama_cpp
    import numpy
    embedder = runtime._embedding_model()
    tokens = [runtime._embedding_tokens(text, i, True) for i, text in enumerate(texts)]
    width = embedder.n_embd()

    def one_pass():
        for group in batches(tokens, per_decode):
            batch = embedder._batch
            batch.reset()
            for seq, ids in enumerate(group):
                batch.add_sequence(ids, seq, True)
            embedder._ctx.kv_cache_clear()
            embedder._ctx.decode(batch)
            total = sum(len(ids) for ids in group)
            pointer = llama_cpp.llama_get_embeddings(embedder._ctx.ctx)
            numpy.ctypeslib.as_array(pointer, shape=(total, width)).copy()
    return one_pass


def measure(texts: list, runs: int, threads: int, work: str) -> dict:
    """Seconds per pass over all texts, for every variant, interleaved run by run so
    that a change in the machine's load hits every variant alike."""
    servers = LiveServers(work)
    engine = None
    try:
        server = start_cpu_server(servers, CPU_THREADS=str(threads),
                                  RKLLM_API_LOG_LEVEL="WARNING")
        post = http_poster(server)
        post(texts[:2])
        engine = embed_engine(texts, threads, work)
        variants = {}
        for size in BATCH_SIZES:
            groups = batches(texts, size)
            variants[("engine", size)] = lambda g=groups: [engine.embed(MODEL, x) for x in g]
            variants[("http", size)] = lambda g=groups: [post(x) for x in g]
        variants[("packed", 8)] = packed_pass(engine._slots["cpu"].runtime, texts)
        seconds = {name: [] for name in variants}
        for _ in range(runs):
            for name, one_pass in variants.items():
                seconds[name].append(seconds_of(one_pass))
        return {name: len(texts) / statistics.median(values)
                for name, values in seconds.items()}
    finally:
        if engine is not None:
            engine.shutdown(timeout=5)
        servers.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    # One thread by default: on a shared 2-core machine two llama.cpp threads spin
    # against each other and the figures swing; on a board give it the big cores.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    texts = passages(args.texts)
    with tempfile.TemporaryDirectory(prefix="embed-bench-") as work:
        rate = measure(texts, args.runs, args.threads, work)
    print(f"{args.texts} texts of 60-120 words, SmolLM2-135M Q4_1, {args.threads} thread(s), "
          f"median of {args.runs} interleaved passes")
    print(f"{'batch':<8}{'http texts/s':<15}{'x batch 1':<12}{'engine texts/s':<17}{'x batch 1':<12}")
    for size in BATCH_SIZES:
        engine, http = rate[("engine", size)], rate[("http", size)]
        print(f"{size:<8}{http:<15.2f}{http / rate[('http', 1)]:<12.2f}{engine:<17.2f}"
              f"{engine / rate[('engine', 1)]:<12.2f}")
    packed = rate[("packed", 8)]
    print(f"packed decoding (8 sequences per llama_decode): {packed:.2f} texts/s; "
          f"runtime (one text per decode, batch 8) / packed = "
          f"{rate[('engine', 8)] / packed:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
