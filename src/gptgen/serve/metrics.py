"""Prometheus text exposition (format 0.0.4) of the server's counters and histograms, written by hand:
the handful of series a serving dashboard needs does not warrant a client library."""

from __future__ import annotations

import bisect
import threading

# Bucket bounds (seconds) for time to first token, per-token latency and whole-request latency.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PREFILL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    def __init__(self, bounds) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, label: str = "") -> list[str]:
        """Exposition lines; `label` is 'key="value"' put on every series."""
        out, running = [], 0
        first = f"{label}," if label else ""
        for bound, c in zip(self.bounds, self.counts):
            running += c
            out.append(f'{name}_bucket{{{first}le="{bound}"}} {running}')
        out.append(f'{name}_bucket{{{first}le="+Inf"}} {self.count}')
        tail = f"{{{label}}}" if label else ""
        out.append(f"{name}_sum{tail} {self.sum:.6f}")
        out.append(f"{name}_count{tail} {self.count}")
        return out


class Metrics:
    """Everything /metrics reports; updated from the event loop, read under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.running = 0  # HTTP requests being answered
        self.cancelled = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.queue = Histogram(QUEUE_BUCKETS)
        self.prefill = Histogram(PREFILL_BUCKETS)

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def render(self, engine_stats: dict, model_name: str) -> str:
        """Every series carries model="<served name>", so one dashboard can tell servers apart."""
        model = f'model="{_label(model_name)}"'
        with self.lock:
            lines = [
                "# HELP gptgen_requests_total HTTP requests answered, by endpoint and status code.",
                "# TYPE gptgen_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'gptgen_requests_total{{{model},endpoint="{endpoint}",status="{status}"}} {n}')
            lines += _simple("gptgen_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                             self.prompt_tokens, model)
            lines += _simple("gptgen_generation_tokens_total", "counter", "Tokens generated for clients.",
                             self.generation_tokens, model)
            lines += _simple("gptgen_requests_cancelled_total", "counter",
                             "Requests cancelled because the client went away.", self.cancelled, model)
            lines += _simple("gptgen_requests_running", "gauge", "Generation requests being answered now.",
                             self.running, model)
            for name, hist, text in (
                    ("gptgen_time_to_first_token_seconds", self.ttft, "Time from arrival to the first token."),
                    ("gptgen_time_per_output_token_seconds", self.tpot, "Time between successive tokens."),
                    ("gptgen_request_latency_seconds", self.e2e, "Time from arrival to the last token."),
                    ("gptgen_queue_time_seconds", self.queue, "Time a request waited for a slot."),
                    ("gptgen_prefill_time_seconds", self.prefill, "Time from a slot to the prompt's end in the cache.")):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"] + hist.lines(name, model)
        engine = {
            "queue_depth": ("gauge", "Requests waiting for a slot."),
            "active_slots": ("gauge", "Slots decoding a request."),
            "max_batch": ("gauge", "Slots of the engine."),
            "steps": ("counter", "Decode steps run by the engine."),
            "tokens_generated": ("counter", "Tokens the engine generated (cancelled requests included)."),
            "prompt_tokens": ("counter", "Prompt tokens the engine prefilled."),
            "requests_finished": ("counter", "Requests the engine finished or cancelled."),
            "requests_cancelled": ("counter", "Requests the engine cancelled."),
            "prefill_chunks": ("counter", "Prompt chunks the engine prefilled."),
            "prefix_cache_queries": ("counter", "Prompts looked up in the prefix cache."),
            "prefix_cache_hits": ("counter", "Prompts that started from a cached prefix (hit rate: hits / queries)."),
            "prefix_tokens_reused": ("counter", "Prompt tokens whose keys and values were copied, not computed."),
        }
        for key, (kind, text) in engine.items():
            if key in engine_stats:
                name = f"gptgen_engine_{key}" + ("_total" if kind == "counter" else "")
                lines += _simple(name, kind, text, engine_stats[key], model)
        lines += _simple("gptgen_model_info", "gauge", "The model this server answers for.", 1, model)
        return "\n".join(lines) + "\n"


def _simple(name: str, kind: str, text: str, value, label: str = "") -> list[str]:
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name}{{{label}}} {value}" if label
            else f"{name} {value}"]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
