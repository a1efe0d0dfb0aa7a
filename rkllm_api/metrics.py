"""Prometheus metrics at /metrics: HTTP requests (prometheus-flask-exporter), what the
engine reports as it works (an EngineObserver), and the state read at each scrape
(active requests, queue per device, loaded models, NPU load and clock).

This is the only module that imports Prometheus packages, and only inside
`create_observer()` / `install()`: without them the server runs, without /metrics.
Each app gets its own CollectorRegistry (no process-wide metric state), so several
apps in one process (tests) never collide.

Names: the seed server's (rkllm_tokens_generated, rkllm_prefill_duration,
rkllm_decode_duration, rkllm_tokens_per_request, rkllm_queue_wait_seconds,
rkllm_active_requests, rkllm_model_load_seconds, rkllm_current_model), and the ones
vLLM and llama.cpp users chart (time to first token, inter-token latency, prompt and
generation token counters, requests by finish reason, queue length per device), plus
KV reuse hits and misses and the prefill tokens reuse avoided. Durations are seconds.
"""
from __future__ import annotations

import bisect
import collections
import functools
import importlib
import logging
import threading
from typing import Optional

from rkllm_api import doctor
from rkllm_api.engine.observer import EngineObserver, GenerationReport

log = logging.getLogger(__name__)

PREFIX = "rkllm"
_MODEL = ("model", "device")
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
_GAP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)
_PHASE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
_WAIT_BUCKETS = (0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 240)
_LOAD_BUCKETS = (0.5, 1, 2, 5, 10, 20, 40, 80, 160)
_TOKEN_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
KV_HITS = ("reuse", "resume")       # modes that kept a conversation's prefix
KV_MISSES = ("full",)               # a conversation turn that had to prefill it all
RECENT_RUNS = 20                    # finished runs kept for the page at /


def available() -> bool:
    """Whether prometheus_client and prometheus-flask-exporter can be imported."""
    try:
        for package in ("prometheus_client", "prometheus_flask_exporter"):
            importlib.import_module(package)
    except ImportError:
        return False
    return True


class EngineMetrics(EngineObserver):
    """The engine's events as Prometheus metrics, in `self.registry`."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram
        self.registry = CollectorRegistry(auto_describe=True)
        self.recent: collections.deque = collections.deque(maxlen=RECENT_RUNS)

        def counter(name, text, labels=_MODEL):
            return Counter(f"{PREFIX}_{name}", text, labels, registry=self.registry)

        def histogram(name, text, buckets, labels=_MODEL):
            return Histogram(f"{PREFIX}_{name}", text, labels, buckets=buckets,
                             registry=self.registry)

        # The seed server's names.
        self.tokens_generated = counter("tokens_generated", "Tokens generated")
        self.prefill_duration = histogram("prefill_duration", "Prefill time per run, seconds "
                                          "(runtime perf)", _PHASE_BUCKETS)
        self.decode_duration = histogram("decode_duration", "Decode time per run, seconds "
                                         "(runtime perf)", _PHASE_BUCKETS)
        self.tokens_per_request = histogram("tokens_per_request", "Tokens generated per run",
                                            _TOKEN_BUCKETS)
        self.queue_wait = histogram("queue_wait_seconds", "Time a run waited for its device",
                                    _WAIT_BUCKETS, labels=("device",))
        self.model_load = histogram("model_load_seconds", "Time to load a model",
                                    _LOAD_BUCKETS)
        # What vLLM and llama.cpp users chart.
        self.ttft = histogram("time_to_first_token_seconds", "From the engine receiving "
                              "the job (queue and load included) to the first token",
                              _TTFT_BUCKETS)
        self.inter_token = GapHistogram(f"{PREFIX}_inter_token_latency_seconds", "Time "
                                        "between two tokens of a run, as the runtime sent "
                                        "them", _GAP_BUCKETS, _MODEL)
        self.registry.register(self.inter_token)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished runs "
                                     "(what KV reuse kept included)")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of "
                                         "finished runs (the same count as tokens_generated)")
        self.finished = counter("requests_finished", "Runs by how they ended: stop, length, "
                                "error, aborted, or the engine's reason (cancelled, "
                                "first_token_timeout, silence_timeout, total_timeout, "
                                "repetition, shutdown)", _MODEL + ("finish_reason",))
        self.kv_hits = counter("kv_cache_hits", "Conversation turns whose prefix the KV "
                               "cache held (mode reuse) or a snapshot restored (resume)",
                               _MODEL + ("mode",))
        self.kv_misses = counter("kv_cache_misses", "Conversation turns that prefilled "
                                 "their whole prompt")
        self.tokens_avoided = counter("prefill_tokens_avoided", "Prompt tokens of reused or "
                                      "resumed conversations that the KV cache already "
                                      "held, so they were not prefilled")

    # ---- EngineObserver ----
    def queue_waited(self, device: str, seconds: float) -> None:
        self.queue_wait.labels(device).observe(seconds)

    def model_loaded(self, model: str, device: str, seconds: float) -> None:
        self.model_load.labels(model, device).observe(seconds)

    def first_token(self, model: str, device: str, seconds: float) -> None:
        self.ttft.labels(model, device).observe(seconds)

    def generation_finished(self, report: GenerationReport) -> None:
        self.recent.append(report)   # the page at / shows the last runs
        labels = (report.model, report.device)
        self.tokens_generated.labels(*labels).inc(report.generated_tokens)
        self.generation_tokens.labels(*labels).inc(report.generated_tokens)
        self.prompt_tokens.labels(*labels).inc(report.prompt_tokens)
        self.tokens_per_request.labels(*labels).observe(report.generated_tokens)
        self.prefill_duration.labels(*labels).observe(report.prefill_seconds)
        self.decode_duration.labels(*labels).observe(report.decode_seconds)
        self.finished.labels(*labels, report.finish).inc()
        self.inter_token.add(labels, report.token_gaps)
        if report.kv_mode in KV_HITS:
            self.kv_hits.labels(*labels, report.kv_mode).inc()
            # Only here: in the other modes reused_tokens is just the gap between the
            # prompt's estimated size and what the runtime counted.
            self.tokens_avoided.labels(*labels).inc(report.reused_tokens)
        elif report.kv_mode in KV_MISSES:
            self.kv_misses.labels(*labels).inc()


    def recent_runs(self) -> list:
        """The last finished runs, newest first."""
        return list(reversed(self.recent))


class GapHistogram:
    """A histogram filled a run at a time: a run's thousands of inter-token gaps are
    counted into the buckets in one pass (bisect in C) instead of one prometheus_client
    observe() each, which cost ~1.7 µs per token (bench/metrics_bench.py). Exported as
    an ordinary histogram at scrape time."""

    def __init__(self, name: str, documentation: str, bounds: tuple, labelnames: tuple):
        self.name, self._documentation = name, documentation
        self._bounds, self._labelnames = tuple(bounds), tuple(labelnames)
        self._bucket_of = functools.partial(bisect.bisect_left, self._bounds)
        self._lock = threading.Lock()
        self._series: dict = {}     # label values -> [counts per bucket (+Inf last), sum]

    def add(self, labels: tuple, values) -> None:
        if not values:
            return
        # bisect_left: the first bound >= value, Prometheus' "le" (less or equal)
        counted = collections.Counter(map(self._bucket_of, values))
        total = sum(values)
        with self._lock:
            series = self._series.setdefault(tuple(labels), [[0] * (len(self._bounds) + 1), 0.0])
            for bucket, count in counted.items():
                series[0][bucket] += count
            series[1] += total

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString
        family = HistogramMetricFamily(self.name, self._documentation,
                                       labels=list(self._labelnames))
        with self._lock:
            series = [(labels, list(counts), total)
                      for labels, (counts, total) in self._series.items()]
        for labels, counts, total in series:
            cumulative, buckets = 0, []
            for bound, count in zip(self._bounds + (float("inf"),), counts):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric(list(labels), buckets, sum_value=total)
        yield family


class StateCollector:
    """Gauges read when /metrics is scraped: the engine's state and the NPU's load and
    clock from the kernel's rknpu files (under `system_root`; no root rights needed
    for the procfs and devfreq files)."""

    def __init__(self, engine, system_root: str = "/"):
        self._engine = engine
        self._root = system_root

    def describe(self):
        return []   # families depend on the board: nothing registered up front

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        health = self._engine.health()
        active = GaugeMetricFamily(f"{PREFIX}_active_requests", "Runs in progress")
        active.add_metric([], len(health["active_requests"]))
        queue = GaugeMetricFamily(f"{PREFIX}_queue_length", "Requests waiting for a device",
                                  labels=["device"])
        current = GaugeMetricFamily(f"{PREFIX}_current_model", "1 for each loaded model",
                                    labels=["model", "device"])
        for device, state in health["devices"].items():
            queue.add_metric([device], state["queue_length"])
            if state["model"]:
                current.add_metric([state["model"], device], 1)
        yield from (active, queue, current)
        yield from self._crashes(health.get("runtime_processes", {}))
        yield from self._npu()

    @staticmethod
    def _crashes(report: dict):
        """Runtime processes that died, and the loads that followed (engine/crashes.py)."""
        from prometheus_client.core import CounterMetricFamily
        crashes = CounterMetricFamily(f"{PREFIX}_runtime_crashes", "Runtime processes that "
                                      "died, by model and cause", labels=["model", "cause"])
        restarts = CounterMetricFamily(f"{PREFIX}_runtime_restarts", "Model loads after a "
                                       "crash of its runtime process", labels=["model"])
        for model, entry in report.get("models", {}).items():
            for cause, count in entry["by_cause"].items():
                crashes.add_metric([model, cause], count)
            restarts.add_metric([model], entry["restarts"])
        yield from (crashes, restarts)

    def _npu(self):
        from prometheus_client.core import GaugeMetricFamily
        load = doctor.npu_load(self._root)
        if load:
            family = GaugeMetricFamily(f"{PREFIX}_npu_load_percent", "NPU load per core, "
                                       "percent (rknpu driver)", labels=["core"])
            for core, percent in sorted(load.items()):
                family.add_metric([str(core)], percent)
            yield family
        frequency = doctor.npu_frequency(self._root)
        if frequency is not None:
            family = GaugeMetricFamily(f"{PREFIX}_npu_frequency_hertz", "NPU clock, Hz")
            family.add_metric([], frequency)
            yield family


def create_observer() -> Optional[EngineMetrics]:
    """The engine observer, or None (metrics off) when Prometheus is not installed."""
    if not available():
        log.warning("metrics off: prometheus-client / prometheus-flask-exporter are not "
                    "installed (pip install prometheus-flask-exporter); /metrics is absent")
        return None
    return EngineMetrics()


def install(app, observer: Optional[EngineMetrics], engine, system_root: str = "/") -> None:
    """/metrics on the app: HTTP requests by endpoint and status, the observer's
    metrics and the state collector, all in the observer's registry."""
    if observer is None:
        return
    from prometheus_flask_exporter import PrometheusMetrics
    observer.registry.register(StateCollector(engine, system_root))
    # group_by endpoint: Flask's endpoint names are few; paths carry model and cache names.
    PrometheusMetrics(app, registry=observer.registry, group_by="endpoint")
    log.info("metrics at /metrics")
