# Why this file exists: the one place the peer stacks (bare, Celery, Ray Serve) share the job
# and the model contract with xpand, so every stack runs exactly the same work:
#   - the workload: a port of loadtests/src/workload.rs (SplitMix64 seasonal rows, 32 variants),
#     checked value for value against the Rust generator;
#   - the input packing of workers/worker/src/plugins/forecast.rs (right-aligned rows, zero
#     left padding with mask 0, the last context_length values kept, f64 narrowed to f32) and
#     its decoding (the first `horizon` columns, widened back to f64);
#   - an ONNX Runtime session built like the worker's (one intra-op thread, one inter-op);
#   - the comparison the correctness check uses.
# The Rust plugin does no normalisation of its own (the model normalises inside its graph), so
# neither does this.

import json
import math
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "workers" / "models" / "forecast"
MANIFEST = json.loads((MODEL_DIR / "manifest.json").read_text())
MODEL_PATH = MODEL_DIR / MANIFEST["file"]
CONTEXT = int(MANIFEST["context_length"])
MAX_HORIZON = int(MANIFEST["max_horizon"])
MIN_HISTORY = int(MANIFEST["min_history"])
VALUES_INPUT, MASK_INPUT = (i["name"] for i in MANIFEST["inputs"])
OUTPUT = MANIFEST["outputs"][0]["name"]

# The job every stack runs (loadtests/src/cli.rs defaults: --rows 40 --history 48 --horizon 12).
ROWS, HISTORY, HORIZON = 40, 48, 12
# As loadtests/src/workload.rs: at most this many cells pre-built, at most 32 variants.
MAX_PREBUILT_CELLS = 4_000_000
MAX_VARIANTS = 32
# Forecasts of two stacks agree when every value is within this relative tolerance.
RTOL = 1e-4

_MASK64 = (1 << 64) - 1
_TAU = 2.0 * math.pi  # std::f64::consts::TAU is the same double


class SplitMix64:
    """loadtests/src/workload.rs's SplitMix64, with u64 wrapping done by masking."""

    def __init__(self, seed: int):
        self.state = seed & _MASK64

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def unit(self) -> float:
        """Uniform in [0, 1)."""
        return (self.next_u64() >> 11) / float(1 << 53)


def _round_half_away(x: float) -> float:
    """Rust's f64::round (half away from zero); Python's round() rounds half to even."""
    whole = math.floor(abs(x))
    frac = abs(x) - whole  # exact for doubles
    r = whole + 1.0 if frac >= 0.5 else whole
    return math.copysign(r, x)


def seasonal_row(rng: SplitMix64, length: int) -> list:
    """Level + trend + one seasonal cycle + noise, rounded to cents, always positive.
    The operations are in the Rust order, so the doubles are bit-identical."""
    periods = (4.0, 7.0, 12.0, 24.0)
    level = 50.0 + 450.0 * rng.unit()
    trend = level * 0.01 * (rng.unit() - 0.5)
    amplitude = level * (0.05 + 0.25 * rng.unit())
    period = periods[rng.next_u64() % len(periods)]
    phase = _TAU * rng.unit()
    row = []
    for t in range(length):
        t = float(t)
        noise = level * 0.03 * (rng.unit() - 0.5) * 2.0
        v = level + trend * t + amplitude * math.sin(_TAU * t / period + phase) + noise
        row.append(_round_half_away(max(v, 0.01) * 100.0) / 100.0)
    return row


def variants(rows: int = ROWS, history: int = HISTORY) -> list:
    """The pre-built jobs' series, variant `seed` from SplitMix64(seed), as workload.rs."""
    cells = rows * history
    count = min(max(MAX_PREBUILT_CELLS // max(cells, 1), 1), MAX_VARIANTS)
    out = []
    for seed in range(count):
        rng = SplitMix64(seed)
        out.append([seasonal_row(rng, history) for _ in range(rows)])
    return out


def job_body(series: list, horizon: int = HORIZON) -> dict:
    """The xpand `POST /v1/jobs` body for these series (as workload.rs builds it)."""
    return {
        "kind": "forecast",
        "input": {"series": series},
        "params": {"horizon": horizon},
        "max_fee": 10_000_000,
    }


def new_session():
    """An ONNX Runtime CPU session like the worker's: one intra-op and one inter-op thread
    (`xpand up` gives each of its two local workers cores / workers = 1 inference thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 2  # warnings, as the worker's environment
    return ort.InferenceSession(
        str(MODEL_PATH), sess_options=options, providers=["CPUExecutionProvider"]
    )


def pack(series: list):
    """forecast.rs `encode`: float32 [N, CONTEXT] values and mask, right-aligned."""
    import numpy as np

    n = len(series)
    values = np.zeros((n, CONTEXT), dtype=np.float32)
    mask = np.zeros((n, CONTEXT), dtype=np.float32)
    for i, row in enumerate(series):
        if len(row) < MIN_HISTORY:
            raise ValueError(
                f"row {i} has {len(row)} observations; the model needs at least {MIN_HISTORY}"
            )
        kept = row[max(len(row) - CONTEXT, 0):]
        start = CONTEXT - len(kept)
        narrowed = np.asarray(kept, dtype=np.float64).astype(np.float32)
        if not np.all(np.isfinite(narrowed)):
            raise ValueError(f"row {i} holds a value that does not fit a 32-bit float")
        values[i, start:] = narrowed
        mask[i, start:] = 1.0
    return values, mask


def decode(output, rows: int, horizon: int) -> list:
    """forecast.rs `decode`: the first `horizon` columns of each row, as f64, all finite."""
    import numpy as np

    if output.ndim != 2 or output.shape[0] != rows or output.shape[1] < horizon:
        raise ValueError(f"the model returned shape {output.shape}; expected [{rows}, >= {horizon}]")
    cut = output[:, :horizon]
    if not np.all(np.isfinite(cut)):
        raise ValueError("the model produced a non-finite forecast")
    return cut.astype(np.float64).tolist()


def check_horizon(horizon: int) -> None:
    if not 1 <= horizon <= MAX_HORIZON:
        raise ValueError(f"horizon {horizon} is outside 1..={MAX_HORIZON} for this model")


def forecast(session, series: list, horizon: int = HORIZON) -> list:
    """Pack, one batched run, decode: what one forecast shard does on an xpand worker."""
    check_horizon(horizon)
    values, mask = pack(series)
    (out,) = session.run([OUTPUT], {VALUES_INPUT: values, MASK_INPUT: mask})
    return decode(out, len(series), horizon)


def forecast_many(session, jobs: list) -> list:
    """Several jobs in one run (the `@serve.batch` variant): rows stacked, results split."""
    import numpy as np

    for _, horizon in jobs:
        check_horizon(horizon)
    packed = [pack(series) for series, _ in jobs]
    values = np.concatenate([v for v, _ in packed])
    mask = np.concatenate([m for _, m in packed])
    (out,) = session.run([OUTPUT], {VALUES_INPUT: values, MASK_INPUT: mask})
    results, offset = [], 0
    for series, horizon in jobs:
        results.append(decode(out[offset:offset + len(series)], len(series), horizon))
        offset += len(series)
    return results


def mismatch(expected: list, got: list, rtol: float = RTOL):
    """None when `got` equals `expected` within rtol (relative, floored at 1.0 like the gateway's
    own check), else a description of the first difference."""
    if not isinstance(got, list) or len(got) != len(expected):
        return f"{len(expected)} rows expected, got {len(got) if isinstance(got, list) else got!r}"
    for r, (a_row, b_row) in enumerate(zip(expected, got)):
        if not isinstance(b_row, list) or len(a_row) != len(b_row):
            return f"row {r}: {len(a_row)} values expected, got {b_row!r}"
        for c, (a, b) in enumerate(zip(a_row, b_row)):
            if not isinstance(b, (int, float)) or not math.isfinite(b):
                return f"row {r} col {c}: expected {a}, got {b!r}"
            if abs(a - b) > rtol * max(abs(a), abs(b), 1.0):
                return f"row {r} col {c}: expected {a}, got {b} (rel diff {abs(a - b) / max(abs(a), 1e-12):.2e})"
    return None


def percentile(sorted_values: list, q: float) -> float:
    """Nearest rank, like the HDR histogram xpand-loadtest reports from."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
