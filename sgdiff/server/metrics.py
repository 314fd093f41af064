"""Prometheus metrics (prometheus_client), one registry per server: queue depth, requests by endpoint
and outcome, request latency, denoising step time, batch sizes and GPU memory."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600, 1800)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)


class ServerMetrics:
    def __init__(self, queue_depth: Callable[[], int], gpu_memory: Callable[[], float]):
        self.registry = CollectorRegistry()
        Gauge("sgdiff_queue_depth", "Requests accepted and not finished (queued or running).",
              registry=self.registry).set_function(queue_depth)  # fmt: skip
        Gauge("sgdiff_gpu_memory_allocated_bytes", "GPU memory the engine's tensors hold in this process now (0 "
              "on the CPU, and with --num-gpus > 1 whose workers hold it: see sgdiff_gpu_peak_memory_bytes).",
              registry=self.registry).set_function(gpu_memory)  # fmt: skip
        self.requests = Counter(
            "sgdiff_requests", "Requests by endpoint and outcome (completed, failed, cancelled, rejected, invalid).",
            ["endpoint", "status"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "sgdiff_request_latency_seconds", "From the request's arrival to its result.", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.step_seconds = Histogram(
            "sgdiff_step_seconds", "Seconds per denoising step.", buckets=STEP_BUCKETS, registry=self.registry
        )
        self.batch_size = Histogram(
            "sgdiff_batch_size", "Requests run together in one batch.", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=self.registry,
        )  # fmt: skip
        self.peak_gpu_memory = Gauge(
            "sgdiff_gpu_peak_memory_bytes", "Peak GPU memory of the last finished request.", registry=self.registry
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
