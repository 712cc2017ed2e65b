"""The cost model fitted to a served instance's step trace (`tokenmill serve --step-trace FILE`).

`calibrate()` (cost_model.py) times a fixed plan of steps on an idle engine in process. A served instance can run
its steps at another speed, and the plan's few prefill sizes can fit the steps an instance runs most only
roughly: on the 2-core box of bench/results/s19, a producer's single-prompt prefills of 70-1250 tokens came out
of the in-process fit 20-40% low (short) to 10-20% high (long), and under the disaggregated load the served
prefill steps took about 1.15x the same steps in process. `fit_trace` fits the same cost model (same terms and
kernel regimes) to the steps an instance ran while serving: for an instance that runs one kind of step (a
prefill or a decode instance), a trace of it serving other requests of the workload is its calibration.

Each trace line is one step: {"t": wall-clock start, "s": seconds, "tokens", "reqs", "kv", "pairs"} (StepShape's
fields). Pure Python apart from the fit (numpy).
"""
from __future__ import annotations

import bisect
import gzip
import json
import math
from pathlib import Path
from typing import Optional, Union

from tokenmill.errors import ConfigError
from tokenmill.perf.cost_model import CostModel, ModelSpec, StepShape

MIN_TRACE_STEPS = 12
# Step sizes (tokens) where a trace fit gets a new regime besides the engine's kernel switches. A step's cost per
# token grows with its size as the activations outgrow the caches (one CPU core here: 0.37 ms a token at 70-260
# tokens, 0.5-0.6 ms at 500-1250); with one line from 64 to 2048 tokens the fit put that curvature into the
# attention-pair term, which then under-predicted steps of several prompts by 8-18% (in process, 2 x 600 tokens
# took 0.93x the time of one 1200-token prompt, not the 0.75x the pair term says). A regime with fewer than 3
# traced steps is merged into the next (CostModel.fit), so a decode trace loses these.
TRACE_SIZE_REGIMES = (256, 1024)


def read_step_trace(path: Union[str, Path], t0: Optional[float] = None,
                    t1: Optional[float] = None) -> list[tuple[StepShape, float]]:
    """(shape, seconds) of each step that started within [t0, t1] (wall clock; None: unbounded)."""
    return [(shape, secs) for _, shape, secs in read_step_trace_timed(path, t0, t1)]


def read_step_trace_timed(path: Union[str, Path], t0: Optional[float] = None,
                          t1: Optional[float] = None) -> list[tuple[float, StepShape, float]]:
    """(wall-clock start, shape, seconds) of each step that started within [t0, t1]; a path ending in .gz is read
    decompressed (kept traces)."""
    try:
        p = Path(path)
        text = gzip.decompress(p.read_bytes()).decode() if p.suffix == ".gz" else p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"step trace not found: {path}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            t, shape = float(r["t"]), StepShape(int(r["tokens"]), int(r["reqs"]), int(r["kv"]), int(r["pairs"]))
            secs = float(r["s"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ConfigError(f"{path}:{n}: not a step trace line") from None
        if (t0 is None or t >= t0) and (t1 is None or t <= t1) and shape.num_tokens > 0 and secs > 0:
            out.append((t, shape, secs))
    return out


def fit_trace(spec: ModelSpec, samples: list[tuple[StepShape, float]], device: str = "cpu",
              switch_tokens: tuple[int, ...] = (), min_steps: int = MIN_TRACE_STEPS) -> CostModel:
    """A CostModel of `spec` fitted to served steps; `switch_tokens`: the engine's kernel regimes (a calibration's
    `switch_tokens`); regimes the trace holds fewer than 3 steps of are merged into the next (CostModel.fit), so
    the model is meant for the kinds of step the trace holds."""
    if len(samples) < min_steps:
        raise ConfigError(f"a step trace of {len(samples)} steps is too short to fit the cost model (at least "
                          f"{min_steps})")
    model = CostModel.prior(spec, device).with_switch_tokens(switch_tokens)
    model.fit(samples)
    tokens = [s.num_tokens for s, _ in samples]
    model.info.update(source="step trace", trace_tokens_range=[min(tokens), max(tokens)],
                      trace_seconds=sum(t for _, t in samples))
    return model


def fit_trace_like(base: CostModel, samples: list[tuple[StepShape, float]],
                   min_steps: int = MIN_TRACE_STEPS) -> CostModel:
    """fit_trace with the model dimensions, device and kernel regimes of another model (an in-process calibration),
    plus TRACE_SIZE_REGIMES."""
    model = fit_trace(base.spec, samples, base.device, (*base.switch_tokens, *TRACE_SIZE_REGIMES), min_steps)
    model.info.update({k: v for k, v in base.info.items() if k in ("model", "dtype", "kv_cache_dtype", "num_threads",
                                                                    "weights_total_bytes", "max_model_len")})
    return model


def trace_speed(model: CostModel, samples: list[tuple[StepShape, float]]) -> float:
    """How fast the traced steps ran against `model`: their summed time over the model's (time-weighted, as
    latencies see it; > 1: slower than the model)."""
    pred = sum(model.predict_shape(s) for s, _ in samples)
    if not samples or pred <= 0:
        raise ConfigError("no traced steps to measure the speed of")
    return sum(t for _, t in samples) / pred


def fit_passes_like(base: CostModel, passes: list[list[tuple[StepShape, float]]],
                    min_steps: int = MIN_TRACE_STEPS) -> tuple[CostModel, list[float]]:
    """One cost model fitted to the steps of several served passes together (fit_trace_like over their union: the
    machine's mean speed over the passes), and each pass's speed against it (trace_speed). Passes of the same
    requests taken at different times (before and after a measured run, or on different days) show the machine's
    drift between them in those speeds, which the scatter within one pass does not (served_path.spread_of_trace)."""
    if not passes or any(not p for p in passes):
        raise ConfigError("every calibration pass needs traced steps")
    model = fit_trace_like(base, [x for p in passes for x in p], min_steps)
    speeds = [trace_speed(model, p) for p in passes]
    model.info["pass_speeds"] = speeds
    return model, speeds


def speed_drift(speeds: list[float]) -> float:
    """The largest relative difference between the speeds of several passes (max / min - 1; 0.0 for one)."""
    if not speeds or min(speeds) <= 0:
        raise ConfigError("speeds must be positive")
    return max(speeds) / min(speeds) - 1.0


def co_busy_fractions(steps: list[tuple[float, StepShape, float]],
                      others: list[tuple[float, StepShape, float]]) -> list[float]:
    """For each of `steps` (wall-clock start, shape, seconds; read_step_trace_timed), the fraction of its time during
    which a step of `others` (another instance's trace, e.g. the consumer's beside a producer's) was running: 1.0
    for a step run entirely while the other instance stepped, 0.0 for one run while it was idle. Both instances on
    one box share its cores, caches and memory bandwidth while co-busy."""
    spans = sorted((t, t + s) for t, _, s in others)
    ends = [e for _, e in spans]  # non-decreasing: one instance's steps do not overlap each other
    out = []
    for t, _, s in steps:
        i, covered = bisect.bisect_right(ends, t), 0.0
        while i < len(spans) and spans[i][0] < t + s:
            covered += max(0.0, min(t + s, spans[i][1]) - max(t, spans[i][0]))
            i += 1
        out.append(min(1.0, covered / s) if s > 0 else 0.0)
    return out


def co_busy_factor(model: CostModel, steps: list[tuple[float, StepShape, float]],
                   others: list[tuple[float, StepShape, float]]) -> dict:
    """How much slower an instance's steps ran while another instance stepped: the least-squares line of
    log(measured / model) over the co-busy fraction (co_busy_fractions), its slope as a factor (`factor`: a step
    run entirely co-busy over one run alone; 1.0: no effect), the correlation `r`, and the time-weighted mean
    co-busy fraction (`mean_co_busy`). Steps of both kinds are needed (a trace always co-busy cannot tell)."""
    fr = co_busy_fractions(steps, others)
    ys = [math.log(s / model.predict_shape(sh)) for (_, sh, s) in steps]
    if len(fr) < 3:
        raise ConfigError("too few steps to fit a co-busy factor")
    mx, my = sum(fr) / len(fr), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in fr)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 1e-12:
        raise ConfigError("every step ran equally co-busy: no co-busy factor can be fitted")
    sxy = sum((x - mx) * (y - my) for x, y in zip(fr, ys))
    total = sum(s for _, _, s in steps)
    return {"factor": math.exp(sxy / sxx), "r": sxy / math.sqrt(sxx * syy) if syy > 0 else 0.0,
            "mean_co_busy": sum(f * s for f, (_, _, s) in zip(fr, steps)) / total,
            "alone_steps": sum(1 for f in fr if f < 0.25), "co_busy_steps": sum(1 for f in fr if f > 0.75)}
