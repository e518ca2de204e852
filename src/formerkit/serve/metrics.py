"""Serving metrics in the Prometheus text format: counters, gauges and latency histograms.

The engine updates one ``Metrics`` object from its thread; ``render`` writes it out for
``GET /metrics``. Histograms are cumulative over fixed buckets (seconds), as Prometheus expects.
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds


class Histogram:
    """Observations counted into cumulative buckets, with their sum and count."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count one observation."""
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        """The Prometheus sample lines of this histogram under ``name``."""
        out = [f'{name}_bucket{{le="{bound}"}} {n}' for bound, n in zip(self.buckets, self.counts, strict=True)]
        return [*out, f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}",
                f"{name}_count {self.count}"]


class Metrics:
    """What the server counts: requests by outcome, tokens, queue depth, batch occupancy, TTFT and ITL."""

    def __init__(self, max_batch: int) -> None:
        self.lock = threading.Lock()
        self.max_batch = max_batch
        self.requests: dict[str, int] = defaultdict(int)  # finish reason -> requests
        self.rejected = 0  # refused because the queue was full
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.waiting = 0
        self.running = 0
        self.steps = 0
        self.prefills = 0
        self.ttft = Histogram()
        self.itl = Histogram()

    def render(self) -> str:
        """All metrics as Prometheus text exposition (version 0.0.4)."""
        with self.lock:
            lines = ["# HELP formerkit_requests_total Requests finished, by finish reason.",
                     "# TYPE formerkit_requests_total counter"]
            lines += [f'formerkit_requests_total{{finish_reason="{reason}"}} {n}'
                      for reason, n in sorted(self.requests.items())]
            simple = [
                ("requests_rejected_total", "counter", "Requests refused because the queue was full.", self.rejected),
                ("prompt_tokens_total", "counter", "Prompt tokens prefilled.", self.prompt_tokens),
                ("generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens),
                ("decode_steps_total", "counter", "Batched decoding steps run.", self.steps),
                ("prefill_passes_total", "counter", "Prefill forward passes run (each over one or more prompts).",
                 self.prefills),
                ("queue_depth", "gauge", "Requests waiting for a batch row.", self.waiting),
                ("running_requests", "gauge", "Requests holding a batch row.", self.running),
                ("batch_occupancy", "gauge", "Fraction of the batch rows in use.", self.running / self.max_batch),
            ]
            for name, kind, help_, value in simple:
                lines += [f"# HELP formerkit_{name} {help_}", f"# TYPE formerkit_{name} {kind}",
                          f"formerkit_{name} {value}"]
            histograms = (("time_to_first_token_seconds", "Time from arrival to the first token.", self.ttft),
                          ("inter_token_latency_seconds", "Time between a request's tokens.", self.itl))
            for name, help_, hist in histograms:
                lines += [f"# HELP formerkit_{name} {help_}", f"# TYPE formerkit_{name} histogram"]
                lines += hist.lines(f"formerkit_{name}")
        return "\n".join(lines) + "\n"
