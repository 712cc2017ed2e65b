"""Step-time model: roofline terms plus fitted overheads, calibrated on the real engine.

    t(step) = o_step[k] + o_tok[k] * tokens + o_req * reqs + o_pair * attn_pairs + o_kv * kv_tokens_read
              + max(bytes / bandwidth, flops / rate[k])             (a rate of 0 drops its term)

k is the step's kernel regime. The engine changes kernels with a step's token count: on the CPU, 1-3 rows
run the packed kernel's register path, 4-63 the fused decoder layer with AMX (or buffered) linears, 64+ its
two halves around SDPA (or dense GEMMs). Each regime has its own fixed cost, cost per token and matmul rate:
one line through all of them under-predicted 4-7 decodes by 40% and over-predicted 1000-token steps by 30%.
`small_regimes` holds the regimes below the largest as (tokens bound, o_step, o_tok, matmul_rate): a step of
fewer than `bound` tokens takes the first matching one; larger steps take the scalar o_step, o_tok and
matmul_rate.
    bytes = weight bytes + kv_tokens_read * KV bytes per token
    flops = tokens * 2 * (layer params) + reqs * 2 * (lm-head params) + attn_pairs * 4 * layers * q_dim

`tokens`: tokens computed this step; `reqs`: requests in it (each samples from its last position);
`kv_tokens_read`: sum of each request's context after the step; `attn_pairs`: sum over the step's
query tokens of the positions each attends to. `calibrate()` times real steps and fits the
bandwidth, matmul rates and overheads by least squares (on relative error). Prediction is pure Python.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

from tokenmill.errors import ConfigError

# (bandwidth bytes/s, matmul flops/s): priors before calibration
DEVICE_PRIORS = {"cpu": (15e9, 60e9), "cuda": (2.5e12, 4e14)}


@dataclass(frozen=True)
class ModelSpec:
    """The model dimensions the cost model needs."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 4
    kv_dtype_bytes: int = 4

    @classmethod
    def from_hf_config(cls, cfg: Any, dtype_bytes: int = 4, kv_dtype_bytes: Optional[int] = None) -> "ModelSpec":
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        return cls(num_layers=int(cfg.num_hidden_layers), hidden_size=int(cfg.hidden_size), num_heads=heads,
                   num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads), head_dim=head_dim,
                   intermediate_size=int(cfg.intermediate_size), vocab_size=int(cfg.vocab_size),
                   dtype_bytes=dtype_bytes, kv_dtype_bytes=kv_dtype_bytes or dtype_bytes)

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size
        return self.num_layers * per_layer

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def weight_bytes(self) -> int:
        """Bytes read per step: every layer's weights and the LM head (embeddings: a few rows only)."""
        return (self.layer_params + self.lm_head_params) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes

    @property
    def attn_flops_per_pair(self) -> int:
        return 4 * self.num_layers * self.num_heads * self.head_dim


@dataclass(frozen=True)
class StepShape:
    num_tokens: int
    num_reqs: int
    kv_tokens_read: int
    attn_pairs: int

    @classmethod
    def of(cls, chunks: list[tuple[int, int]]) -> "StepShape":
        """From (num_computed_before, num_scheduled) per request."""
        return cls(num_tokens=sum(n for _, n in chunks), num_reqs=len(chunks),
                   kv_tokens_read=sum(c + n for c, n in chunks),
                   attn_pairs=sum(n * c + n * (n + 1) // 2 for c, n in chunks))


def shape_of_schedule(sched: Any) -> StepShape:
    """The StepShape of a tokenmill.core SchedulerOutput."""
    computed = {r.req_id: r.num_computed_tokens for r in sched.scheduled_new_reqs}
    computed.update({r.req_id: r.num_computed_tokens for r in sched.scheduled_cached_reqs})
    return StepShape.of([(computed.get(rid, 0), n) for rid, n in sched.num_scheduled_tokens.items()])


@dataclass
class CostModel:
    """Predicts one engine step's wall time in seconds (see the module doc)."""

    spec: ModelSpec
    bandwidth: float = 15e9
    matmul_rate: float = 60e9
    o_step: float = 0.0
    o_req: float = 0.0
    o_tok: float = 0.0
    o_pair: float = 0.0
    o_kv: float = 0.0  # seconds per context token read (the KV stream of decodes over long contexts)
    # kernel regimes below the largest: (tokens bound, o_step, o_tok, matmul_rate), bounds ascending
    small_regimes: tuple[tuple[int, float, float, float], ...] = ()
    device: str = "cpu"
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def prior(cls, spec: ModelSpec, device: str = "cpu") -> "CostModel":
        bw, rate = DEVICE_PRIORS["cuda" if device.startswith("cuda") else "cpu"]
        return cls(spec, bw, rate, o_step=2e-3, o_req=1e-4, device=device, info={"calibrated": False})

    def terms(self, num_tokens: int, num_reqs: int, kv_tokens_read: int, attn_pairs: int) -> tuple[float, float]:
        """(memory bytes, flops) of a step."""
        s = self.spec
        mem = s.weight_bytes + kv_tokens_read * s.kv_bytes_per_token
        flops = (2 * s.layer_params * num_tokens + 2 * s.lm_head_params * num_reqs
                 + s.attn_flops_per_pair * attn_pairs)
        return float(mem), float(flops)

    @property
    def switch_tokens(self) -> tuple[int, ...]:
        """The token counts where the regime changes."""
        return tuple(r[0] for r in self.small_regimes)

    def regime(self, num_tokens: int) -> tuple[float, float, float]:
        """(o_step, o_tok, matmul_rate) of a step of num_tokens tokens."""
        for bound, o_step, o_tok, rate in self.small_regimes:
            if num_tokens < bound:
                return o_step, o_tok, rate
        return self.o_step, self.o_tok, self.matmul_rate

    def _regime_index(self, num_tokens: int) -> int:
        return sum(1 for b in self.switch_tokens if num_tokens >= b)

    def predict(self, num_tokens: int, num_reqs: int, kv_tokens_read: int, attn_pairs: int) -> float:
        if num_tokens <= 0:
            return 0.0
        mem, flops = self.terms(num_tokens, num_reqs, kv_tokens_read, attn_pairs)
        t_mem = mem / self.bandwidth if self.bandwidth > 0 else 0.0  # 0: the fit found no such term
        o_step, o_tok, rate = self.regime(num_tokens)
        t_flops = flops / rate if rate > 0 else 0.0
        return (o_step + o_tok * num_tokens + self.o_req * num_reqs + self.o_pair * attn_pairs
                + self.o_kv * kv_tokens_read + max(t_mem, t_flops))

    def predict_shape(self, shape: StepShape) -> float:
        return self.predict(shape.num_tokens, shape.num_reqs, shape.kv_tokens_read, shape.attn_pairs)

    # ---- fitting -------------------------------------------------------------------------------
    def fit(self, samples: list[tuple[StepShape, float]], iters: int = 8) -> dict[str, float]:
        """Least-squares fit (relative error, non-negative) of bandwidth, matmul rates and overheads.

        The regimes are those of `switch_tokens` (set them before fitting); a regime with fewer than 3 timed steps
        is merged into the next larger one."""
        import numpy as np

        if len(samples) < 6:
            raise ConfigError(f"need at least 6 timed steps to fit the cost model, got {len(samples)}")
        bounds = list(self.switch_tokens)
        for b in list(bounds):  # merge regimes the samples do not cover
            i = bounds.index(b)
            lo = bounds[i - 1] if i else 0
            if sum(1 for sh, _ in samples if lo <= sh.num_tokens < b) < 3:
                bounds.remove(b)
        if bounds and sum(1 for sh, _ in samples if sh.num_tokens >= bounds[-1]) < 3:
            bounds.pop()
        priors = [self.regime(b - 1)[2] or self.matmul_rate for b in bounds] + [self.matmul_rate]
        priors = [p if p > 0 else DEVICE_PRIORS["cuda" if self.device.startswith("cuda") else "cpu"][1] for p in priors]
        nreg = len(bounds) + 1
        self.small_regimes = tuple((b, 0.0, 0.0, 0.0) for b in bounds)
        reg = np.asarray([self._regime_index(sh.num_tokens) for sh, _ in samples])
        rows, times = [], []
        for sh, t in samples:
            mem, flops = self.terms(sh.num_tokens, sh.num_reqs, sh.kv_tokens_read, sh.attn_pairs)
            rows.append((sh.num_reqs, sh.num_tokens, sh.attn_pairs, mem, flops, sh.kv_tokens_read))
            times.append(t)
        X = np.asarray(rows, dtype=np.float64)
        y = np.asarray(times, dtype=np.float64)
        w = 1.0 / np.maximum(y, 1e-6)
        onehot = (reg[:, None] == np.arange(nreg)[None, :]).astype(np.float64)
        rate_of = np.asarray(priors)[reg]
        compute_bound = X[:, 4] / rate_of > X[:, 3] / self.bandwidth
        # columns: o_req, o_pair, o_kv, 1/bw (memory-bound rows) | per regime: o_step, o_tok, 1/rate (compute-bound)
        coef = np.zeros(4 + 3 * nreg)
        for _ in range(iters):
            cb = compute_bound[:, None] * onehot
            A = np.column_stack([X[:, 0], X[:, 2], X[:, 5], np.where(compute_bound, 0.0, X[:, 3]),
                                 onehot, onehot * X[:, 1:2], cb * X[:, 4:5]])
            coef = _nnls(A * w[:, None], y * w)
            inv_bw = coef[3] if coef[3] > 0 else 1.0 / self.bandwidth
            inv_rates = np.asarray([c if c > 0 else 1.0 / p for c, p in zip(coef[4 + 2 * nreg:], priors)])
            new_cb = X[:, 4] * inv_rates[reg] > X[:, 3] * inv_bw
            if (new_cb == compute_bound).all():
                break
            compute_bound = new_cb
        self.o_req, self.o_pair, self.o_kv = float(coef[0]), float(coef[1]), float(coef[2])
        # a roofline term the fit gave no weight (absorbed by the overheads) is dropped: 0 = absent
        self.bandwidth = float(1.0 / coef[3]) if coef[3] > 0 else 0.0
        steps, toks, rates = coef[4:4 + nreg], coef[4 + nreg:4 + 2 * nreg], coef[4 + 2 * nreg:]
        per = [(float(a), float(b), float(1.0 / c) if c > 0 else 0.0) for a, b, c in zip(steps, toks, rates)]
        self.small_regimes = tuple((bd, *p) for bd, p in zip(bounds, per[:-1]))
        self.o_step, self.o_tok, self.matmul_rate = per[-1]
        pred = np.asarray([self.predict_shape(sh) for sh, _ in samples])
        rel = np.abs(pred - y) / y
        stats = {"num_steps": len(samples), "median_rel_error": float(np.median(rel)),
                 "max_rel_error": float(rel.max())}
        self.info.update(calibrated=True, **stats)
        return stats

    def with_switch_tokens(self, bounds: "list[int] | tuple[int, ...]") -> "CostModel":
        """Set the regime bounds to fit (each regime starts from this model's large-step constants)."""
        bs = sorted({int(b) for b in bounds if b and b > 1})
        self.small_regimes = tuple((b, self.o_step, self.o_tok, self.matmul_rate) for b in bs)
        return self

    def scaled(self, factor: float) -> "CostModel":
        """The same model on a device `factor` times slower: every prediction times factor (overheads times
        factor, bandwidth and rates divided by it)."""
        if not factor > 0:
            raise ConfigError(f"scale factor must be positive, got {factor}")
        f = factor
        return replace(self, bandwidth=self.bandwidth / f, matmul_rate=self.matmul_rate / f, o_step=self.o_step * f,
                       o_req=self.o_req * f, o_tok=self.o_tok * f, o_pair=self.o_pair * f, o_kv=self.o_kv * f,
                       small_regimes=tuple((b, s * f, t * f, r / f) for b, s, t, r in self.small_regimes),
                       info=dict(self.info))

    # ---- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["small_regimes"] = [list(r) for r in self.small_regimes]
        d["format"] = "tokenmill-cost-model-1"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CostModel":
        if d.get("format") != "tokenmill-cost-model-1":
            raise ConfigError("not a tokenmill cost model file (format tokenmill-cost-model-1)")
        d = {k: v for k, v in d.items() if k != "format"}
        small = d.pop("small_step_tokens", 0)  # files of session 5: one small-step regime, its own rate only
        rate_small = d.pop("matmul_rate_small", 0.0)
        if small and "small_regimes" not in d:
            d["small_regimes"] = [[small, d.get("o_step", 0.0), d.get("o_tok", 0.0), rate_small]]
        d["small_regimes"] = tuple((int(r[0]), float(r[1]), float(r[2]), float(r[3]))
                                   for r in d.get("small_regimes", ()))
        return cls(spec=ModelSpec(**d.pop("spec")), **d)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> "CostModel":
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except FileNotFoundError:
            raise ConfigError(f"calibration file not found: {path}") from None
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ConfigError(f"bad calibration file {path}: {e}") from None


def _nnls(A: Any, b: Any, iters: int = 50) -> Any:
    """Non-negative least squares (Lawson-Hanson active set; columns scaled). A column enters while the residual
    still pulls it up; a step that would turn an entered coefficient negative stops at zero and drops it. The
    coefficients of collinear columns (the overheads of one regime) can share the fit instead of one being dropped
    for good on its first negative value. `iters` bounds the outer loop in units of the column count."""
    import numpy as np

    scale = np.maximum(np.abs(A).max(axis=0), 1e-30)
    As = A / scale
    usable = np.abs(A).max(axis=0) > 0
    n = A.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 1e-10 * max(1.0, float(np.abs(As).max()) * float(np.abs(b).max()) * len(b))
    for _ in range(iters * max(1, n)):
        w = As.T @ (b - As @ x)
        free = usable & ~passive & (w > tol)
        if not free.any():
            break
        passive[np.argmax(np.where(free, w, -np.inf))] = True
        while True:
            z = np.zeros(n)
            z[passive], *_ = np.linalg.lstsq(As[:, passive], b, rcond=None)
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = float(np.min(x[neg] / (x[neg] - z[neg])))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
            if not passive.any():
                break
    return np.maximum(x, 0.0) / scale


# ---- calibration on the real engine ------------------------------------------------------------
CALIBRATION_PLAN = (  # (batch size, prompt tokens, output tokens): prefills of many sizes, decodes of many batches
    (1, 16, 4), (1, 64, 4), (1, 256, 4), (1, 512, 2), (1, 1024, 2), (2, 700, 2), (4, 128, 12),
    (8, 32, 16), (16, 24, 12), (32, 16, 8), (12, 300, 6), (3, 1500, 2), (8, 400, 12), (48, 24, 6),
    # decodes over long contexts: the KV read (45 KiB a token for SmolLM2 in float32) is what grows a step as
    # contexts grow; without these the fit found no bandwidth term and under-predicted loaded decode steps ~2x
    (8, 900, 20), (16, 500, 16),
)


def spec_of_engine(engine: Any) -> ModelSpec:
    """ModelSpec of a loaded LLMEngine / EngineCore / LLM."""
    core = _core_of(engine)
    runner = core.runner
    import torch

    from tokenmill.worker.memory_planner import dtype_bytes

    elem = torch.tensor([], dtype=runner.dtype).element_size()
    # the resolved KV dtype (int8's per-token scales, 6% more, are left out)
    kv = dtype_bytes(runner.kv_cache_dtype)
    return ModelSpec.from_hf_config(runner.hf_config, dtype_bytes=elem, kv_dtype_bytes=kv)


def kernel_switch_tokens(model: Any) -> list[int]:
    """Step sizes (tokens) at which the engine's CPU kernels change: the packed linears' register path ends
    (DIRECT_MAX_ROWS), their AMX path or dense copies start, the fused layer hands over to its halves."""
    from tokenmill.model.layers.quantized import QuantizedLinear, amx_switch_rows, dense_switch_rows
    from tokenmill.ops.cpu.layer import fused_switch_tokens
    from tokenmill.ops.cpu.qlinear import DIRECT_MAX_ROWS

    modules = list(model.modules())
    if not any(isinstance(m, QuantizedLinear) for m in modules):
        return []
    cands = [DIRECT_MAX_ROWS + 1, amx_switch_rows(modules), dense_switch_rows(modules), fused_switch_tokens(model)]
    return sorted({c for c in cands if c})


def _core_of(engine: Any) -> Any:
    if hasattr(engine, "engine"):  # LLM facade
        engine = engine.engine
    return engine.core if hasattr(engine, "core") else engine


def _resident_weight_bytes(model: Any, estimate: int) -> int:
    """Bytes of the loaded model's parameters and buffers as they sit in memory (packed GGUF / 16-bit weights at
    their own size; the AMX tiles are counted apart, perf/cli.py amx_tiles_bytes); `estimate` without a model."""
    if model is None or not hasattr(model, "parameters"):
        return estimate
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) or estimate


def calibrate(llm_or_engine: Any, plan: tuple = CALIBRATION_PLAN, max_steps_per_case: int = 12,
              repeats: int = 1) -> CostModel:
    """Time real steps of varied shape on the engine's device and fit a CostModel to them."""
    from tokenmill.core.scheduler import Scheduler
    from tokenmill.request import Request
    from tokenmill.sampling_params import SamplingParams

    core = _core_of(llm_or_engine)
    runner = core.runner
    spec = spec_of_engine(core)
    model = CostModel.prior(spec, str(runner.device))
    model.with_switch_tokens(kernel_switch_tokens(runner.model))
    samples: list[tuple[StepShape, float]] = []
    cfg = core.config.scheduler
    vocab = spec.vocab_size
    for rep in range(repeats + 1):  # round 0 warms up on two cases and is discarded
        for case, (batch, n_in, n_out) in enumerate(plan if rep else plan[:2]):
            n_in = min(n_in, runner.max_model_len - n_out - 1)
            sched = Scheduler(cfg, runner.num_blocks, core.config.cache.block_size, runner.max_model_len,
                              enable_prefix_caching=False)
            for b in range(batch):
                ids = [(1000 + 7919 * (b + 31 * case + 977 * rep) + 13 * i) % (vocab - 10) + 5 for i in range(n_in)]
                sched.add_request(Request(f"cal{rep}-{case}-{b}", ids, SamplingParams(
                    temperature=0.0, max_tokens=n_out, ignore_eos=True), (), time.monotonic(), n_out))
            steps = 0
            while sched.has_work() and steps < max_steps_per_case:
                t0 = time.perf_counter()  # the whole step: schedule, forward + sample, bookkeeping
                out = sched.schedule()
                result = runner.execute_model(out)
                sched.update_from_output(out, result)
                dt = time.perf_counter() - t0
                steps += 1
                if rep > 0 and out.total_num_scheduled_tokens:
                    samples.append((shape_of_schedule(out), dt))
            if sched.has_unfinished_requests():
                sched.abort_requests(list(sched.requests))
                out = sched.schedule()
                runner.execute_model(out)
    model.fit(samples)
    cfg_model = core.config.model
    hf = runner.hf_config
    tied = bool(getattr(hf, "tie_word_embeddings", False))
    total_params = spec.layer_params + spec.lm_head_params * (1 if tied else 2) + spec.num_layers * 2 * spec.hidden_size
    model.info.update(model=cfg_model.model, dtype=str(runner.dtype).removeprefix("torch."),
                      kv_cache_dtype=runner.kv_cache_dtype,
                      weights_total_bytes=_resident_weight_bytes(runner.model, total_params * spec.dtype_bytes),
                      max_model_len=int(getattr(hf, "max_position_embeddings", None) or runner.max_model_len),
                      num_threads=_num_threads())
    model.info["samples"] = [[s.num_tokens, s.num_reqs, s.kv_tokens_read, s.attn_pairs, t] for s, t in samples]
    return model


def _num_threads() -> int:
    import torch

    return int(torch.get_num_threads())
