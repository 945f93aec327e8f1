"""The server's metrics in the Prometheus text format (version 0.0.4), with bounded labels only
(never a request id): requests by outcome, queue depth, in-flight images, latency histograms per
phase, batch sizes, iterations, gang failures. Thread-safe; no dependency."""
from __future__ import annotations

import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
ITER_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 1000)


class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(float(b) for b in buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.total += 1
        self.sum += v


def _labels(d: dict) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(d.items())) + "}" if d else ""


class Metrics:
    HELP = {
        "deqir_requests_total": ("counter", "restore requests by outcome (ok, bad_request, too_large, queue_full, "
                                            "not_ready, deadline, cancelled, gang_failed, error)"),
        "deqir_queue_depth": ("gauge", "requests waiting in the queue"),
        "deqir_inflight": ("gauge", "requests being restored"),
        "deqir_ready": ("gauge", "1 when every rank has joined, the model is loaded and warmed up, and the gang is "
                                 "whole"),
        "deqir_batches_total": ("counter", "restore() calls by how they ran (one process, sharded, data-parallel)"),
        "deqir_gang_failures_total": ("counter", "collectives or ranks that failed (the gang is then not reused)"),
        "deqir_request_seconds": ("histogram", "request latency by phase (queue, solve, total)"),
        "deqir_batch_size": ("histogram", "images per restore() call"),
        "deqir_iterations": ("histogram", "joint-map evaluations K per image (serial: N)"),
    }

    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[tuple, float] = {}
        self.gauges: dict[str, float] = {"deqir_queue_depth": 0, "deqir_inflight": 0, "deqir_ready": 0}
        self.hists: dict[tuple, _Histogram] = {}

    def inc(self, name: str, value: float = 1, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self.counters[key] = self.counters.get(key, 0) + value

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self.gauges[name] = value

    def observe(self, name: str, value: float, **labels) -> None:
        buckets = {"deqir_batch_size": BATCH_BUCKETS, "deqir_iterations": ITER_BUCKETS}.get(name, LATENCY_BUCKETS)
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self.hists.setdefault(key, _Histogram(buckets)).observe(value)

    def count(self, name: str, **labels) -> float:
        with self._lock:
            return self.counters.get((name, tuple(sorted(labels.items()))), 0)

    def snapshot(self) -> dict:
        """Every value as plain data (picklable, for ``merged``)."""
        with self._lock:
            return {"counters": [(k[0], k[1], v) for k, v in self.counters.items()], "gauges": dict(self.gauges),
                    "hists": [(k[0], k[1], h.buckets, list(h.counts), h.total, h.sum) for k, h in self.hists.items()]}

    @classmethod
    def merged(cls, snapshots: list[dict]) -> "Metrics":
        """The sum of several servers' snapshots (the replicas of one deployment): counters,
        gauges and histogram buckets add exactly; ``deqir_ready`` becomes the ready replicas and
        ``deqir_replicas`` the snapshots summed."""
        out = cls()
        out.gauges["deqir_replicas"] = len(snapshots)
        for snap in snapshots:
            for name, labels, v in snap["counters"]:
                key = (name, tuple(labels))
                out.counters[key] = out.counters.get(key, 0) + v
            for name, v in snap["gauges"].items():
                out.gauges[name] = out.gauges.get(name, 0) + v
            for name, labels, buckets, counts, total, total_sum in snap["hists"]:
                h = out.hists.setdefault((name, tuple(labels)), _Histogram(buckets))
                if h.buckets != tuple(buckets):
                    continue                # another version's buckets: not addable
                h.counts = [a + b for a, b in zip(h.counts, counts)]
                h.total += total
                h.sum += total_sum
        return out

    def render(self) -> str:
        lines = []
        helps = dict(self.HELP)
        if "deqir_replicas" in self.gauges:     # a deployment's sum (merged)
            helps["deqir_ready"] = ("gauge", "replicas whose gang is whole, model loaded and warmed up")
            helps["deqir_replicas"] = ("gauge", "replicas summed in this reply (those heard from in the last "
                                                "seconds)")
        with self._lock:
            for name, (kind, text) in helps.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                if kind == "gauge":
                    lines.append(f"{name} {self.gauges.get(name, 0):g}")
                elif kind == "counter":
                    series = [(dict(k[1]), v) for k, v in self.counters.items() if k[0] == name]
                    lines += [f"{name}{_labels(lab)} {v:g}" for lab, v in sorted(series, key=lambda s: str(s[0]))]
                    if not series:
                        lines.append(f"{name} 0")
                else:
                    for key, h in sorted(((k, h) for k, h in self.hists.items() if k[0] == name), key=str):
                        lab = dict(key[1])
                        for b, c in zip(h.buckets, h.counts):
                            lines.append(f"{name}_bucket{_labels({**lab, 'le': f'{b:g}'})} {c}")
                        lines.append(f"{name}_bucket{_labels({**lab, 'le': '+Inf'})} {h.total}")
                        lines.append(f"{name}_sum{_labels(lab)} {h.sum:.6g}")
                        lines.append(f"{name}_count{_labels(lab)} {h.total}")
        return "\n".join(lines) + "\n"
