"""Step-time estimators the slo policy plans with: the `StepCostModel` interface (what a calibrated
`tokenmill.perf.cost_model.CostModel` provides), `OnlineStepModel` (learned online when there is no calibration)
and `CorrectedStepModel` (a calibration corrected online for what it does not see inside a server).

Pure Python over floats, imported by tokenmill.core (which never imports torch): keep this module free of torch
and numpy.
"""
from __future__ import annotations

from typing import Protocol

from tokenmill.perf.linalg import bounded_covariance


class StepCostModel(Protocol):
    """Predicts the wall time of one engine step (see tokenmill.perf.cost_model.CostModel)."""

    def predict(self, num_tokens: int, num_reqs: int, kv_tokens_read: int, attn_pairs: int) -> float: ...


class OnlineStepModel:
    """Step time learned online: recursive least squares of t = a + b * tokens + c * kv_tokens_read.

    Used by the SLO policy when no calibrated cost model is given. Samples are the wall time between
    consecutive schedule() calls (what a decode actually waits); a sample much longer than predicted
    (the engine was idle) is skipped once the model has seen enough steps. The fit runs on features of alike
    size (tokens per thousand, KV reads per 100k), keeps its coefficients non-negative (what a step time
    is made of; and intercept and KV reads are collinear over alike decode steps, where an unconstrained fit
    leans on a negative coefficient) and its covariance bounded (see _bounded_covariance).
    """

    _UNITS = (1.0, 1e3, 1e5)

    def __init__(self, forget: float = 0.995, prior: tuple[float, float, float] = (0.02, 2e-4, 1e-6)):
        self.theta = [max(0.0, v) for v in prior]
        self._p0 = (1e4, 1e4, 1e4)  # prior variances of the scaled coefficients: uninformative
        self.p = [[self._p0[i] if i == j else 0.0 for j in range(3)] for i in range(3)]
        self.forget = forget
        self.num_samples = 0

    def predict(self, num_tokens: int, num_reqs: int, kv_tokens_read: int, attn_pairs: int) -> float:
        a, b, c = self.theta
        return a + b * num_tokens + c * kv_tokens_read

    def observe(self, num_tokens: int, kv_tokens_read: int, seconds: float) -> None:
        pred = self.predict(num_tokens, 0, kv_tokens_read, 0)
        if self.num_samples >= 8 and seconds > 4.0 * pred + 0.05:
            return  # idle gap, not a step
        u = self._UNITS
        x = [1.0, num_tokens / u[1], kv_tokens_read / u[2]]
        th = [self.theta[i] * u[i] for i in range(3)]
        px = [sum(self.p[i][j] * x[j] for j in range(3)) for i in range(3)]
        denom = self.forget + sum(x[i] * px[i] for i in range(3))
        k = [v / denom for v in px]
        err = seconds - sum(th[i] * x[i] for i in range(3))
        self.theta = [max(0.0, th[i] + k[i] * err) / u[i] for i in range(3)]
        self.p = bounded_covariance([[(self.p[i][j] - k[i] * px[j]) / self.forget for j in range(3)] for i in range(3)],
                                     self._p0)
        self.num_samples += 1


class CorrectedStepModel:
    """A calibrated step model corrected online for what it does not see: observed = scale * predicted + offset.

    The calibration times bare engine steps; inside a server each step also pays for streaming, detokenizing
    and the event loop sharing the cores: a fixed part per step (`offset`) and a slowdown of the step's own
    work (`scale`: on a 2-core CPU the server's threads take cycles from the forward, so long steps overran an
    offset-only correction by ~30%). Both are fitted by recursive least squares with forgetting on the wall time
    between consecutive schedule() calls (idle gaps skipped); the covariance is bounded so that a run of
    same-sized steps cannot wind it up.
    """

    def __init__(self, base: StepCostModel, forget: float = 0.98, max_scale: float = 4.0):
        self.base = base
        self.forget = forget
        self.max_scale = max_scale
        self.scale, self.offset = 1.0, 0.0
        # step times vary by a share of their length (~20%), so each sample is weighted by 1 / (pred + 10 ms)
        # and the prior variances are over that relative noise (0.2^2): scale within ~0.2, offset within ~10 ms
        self._p0 = (0.05 / 0.04, 1e-4 / 0.04)
        self._p = [[self._p0[0], 0.0], [0.0, self._p0[1]]]
        self.num_samples = 0

    def _correct(self, pred: float) -> float:
        return self.scale * pred + max(0.0, self.offset)  # scale is kept within [0.5, max_scale] by observe()

    def predict(self, num_tokens: int, num_reqs: int, kv_tokens_read: int, attn_pairs: int) -> float:
        return self._correct(self.base.predict(num_tokens, num_reqs, kv_tokens_read, attn_pairs))

    def observe(self, num_tokens: int, num_reqs: int, kv_tokens_read: int, attn_pairs: int, seconds: float) -> None:
        pred = self.base.predict(num_tokens, num_reqs, kv_tokens_read, attn_pairs)
        if seconds > 4.0 * self._correct(pred) + 0.05:
            return  # idle gap, not a step
        w = 1.0 / (pred + 0.01)
        x = (pred * w, w)
        p = self._p
        px = (p[0][0] * x[0] + p[0][1] * x[1], p[1][0] * x[0] + p[1][1] * x[1])
        denom = self.forget + x[0] * px[0] + x[1] * px[1]
        k = (px[0] / denom, px[1] / denom)
        err = (seconds - (self.scale * pred + self.offset)) * w
        self.scale += k[0] * err
        self.offset += k[1] * err
        p = [[(p[i][j] - k[i] * px[j]) / self.forget for j in range(2)] for i in range(2)]
        self._p = bounded_covariance(p, self._p0)
        # projected estimate: outside these bounds the fit has drifted along a direction the steps do not excite
        self.scale = min(self.max_scale, max(0.5, self.scale))
        self.offset = min(1.0, max(-0.05, self.offset))
        self.num_samples += 1
