"""FineTuner: fine-tuning jobs run by the engine core between inference steps, on the served model's weights.

Inference goes first. EngineCore calls `train(usage)` after each step:
  - usage None (no inference work): one chunk of up to max_step_tokens padded tokens whose predicted time
    fits max_step_ms (at least one example, so training always progresses); the loop then looks for new
    requests, so an arrival waits at most one chunk.
  - after an inference step: nothing while requests wait for admission; otherwise a chunk within the tokens
    the step left (max_num_batched_tokens - scheduled, capped by max_step_tokens) and within the time the
    running decodes' TPOT target leaves (tpot_margin x slo_tpot_ms - the step's own time; without a target,
    max_step_ms).
Chunk times are predicted by tokenmill.perf's OnlineStepModel (the slo policy's step model), fitted to the
measured training chunks (t = a + b * padded tokens + c * attention pairs).
One job trains at a time; the others queue. Updates for the API side collect in `take_updates()`.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

from tokenmill.finetune.jobs import JobEvent, JobSpec, JobUpdate
from tokenmill.finetune.trainer import Trainer
from tokenmill.perf.step_models import OnlineStepModel

logger = logging.getLogger(__name__)


@dataclass
class StepUsage:
    """What the inference step just run took."""

    seconds: float
    tokens: int  # scheduled tokens
    num_waiting: int  # requests still waiting for admission


class FineTuner:
    def __init__(self, model_fn: Callable[[], Any], max_step_tokens: int, max_step_ms: float,
                 max_batched_tokens: int, tpot_ms: Optional[float] = None, tpot_margin: float = 0.8,
                 threads: int = 1):
        self.model_fn = model_fn  # the served model (raises FineTuneUnsupported where it is not in this process)
        self.max_step_tokens = max_step_tokens
        self.max_step_s = max_step_ms / 1000.0
        self.max_batched_tokens = max_batched_tokens
        self.tpot_s = tpot_ms / 1000.0 if tpot_ms else None
        self.tpot_margin = tpot_margin
        self.threads = threads  # torch CPU threads during a chunk (0: leave torch's setting)
        # training costs about 3x a forward; the prior only steers the first chunks, the fit takes over
        self.step_model = OnlineStepModel(prior=(0.005, 1e-3, 1e-7))
        self.queue: deque[JobSpec] = deque()
        self.current: Optional[JobSpec] = None
        self.trainer: Optional[Trainer] = None
        self._updates: list[JobUpdate] = []
        self.trained_tokens = 0  # all jobs, for throughput figures
        self.train_seconds = 0.0

    # ---- commands ------------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> None:
        self.queue.append(spec)
        self._update(spec.job_id, "queued", [JobEvent(f"Job queued ({len(spec.examples)} examples)")])

    def cancel(self, job_id: str) -> bool:
        """Stop a queued or running job and free its LoRA weights, gradients and optimizer state."""
        for spec in list(self.queue):
            if spec.job_id == job_id:
                self.queue.remove(spec)
                self._finish(job_id, "cancelled", [JobEvent("Job cancelled")])
                return True
        if self.current is not None and self.current.job_id == job_id:
            self._end_current("cancelled", [JobEvent("Job cancelled")])
            return True
        return False

    def has_work(self) -> bool:
        return self.current is not None or bool(self.queue)

    def take_updates(self) -> list[JobUpdate]:
        out, self._updates = self._updates, []
        return out

    # ---- training ------------------------------------------------------------------------------
    def train(self, usage: Optional[StepUsage]) -> int:
        """At most one chunk of the running job (starting the next queued one); returns tokens trained."""
        if self.current is None and not self._start_next():
            return 0
        if usage is None:
            cap, allowance = self.max_step_tokens, self.max_step_s
        else:
            if usage.num_waiting > 0:
                return 0
            cap = min(self.max_step_tokens, self.max_batched_tokens - usage.tokens)
            target = self.tpot_margin * self.tpot_s if self.tpot_s is not None else self.max_step_s
            allowance = min(self.max_step_s, target - usage.seconds)
            if cap <= 0 or allowance <= 0:
                return 0

        def fits(padded: int, pairs: int) -> bool:
            return padded <= cap and self.step_model.predict(padded, 0, pairs, 0) <= allowance

        trainer = self.trainer
        idxs = trainer.next_chunk(fits)
        if not idxs and usage is None:  # idle: one example even if predicted long (each fits max_step_tokens)
            idxs = trainer.next_chunk(lambda p, a: True)[:1]
        if not idxs:
            return 0
        try:
            with _torch_threads(self.threads):
                res = trainer.run_chunk(idxs)
        except Exception as exc:  # noqa: BLE001 - a failed job must not stop serving
            logger.exception("fine-tuning job %s failed", self.current.job_id)
            self._end_current("failed", [JobEvent(f"Training failed: {type(exc).__name__}: {exc}", "error")],
                              error={"message": f"{type(exc).__name__}: {exc}", "code": "training_error"})
            return 0
        self.step_model.observe(res.padded_tokens, res.attn_pairs, res.seconds)
        self.trained_tokens += res.tokens
        self.train_seconds += res.seconds
        if res.step_loss is not None:
            spec = self.current
            ev = JobEvent(f"Step {res.step}/{trainer.total_steps}: training loss={res.step_loss:.4f}", type="metrics",
                          data={"step": res.step, "total_steps": trainer.total_steps, "train_loss": res.step_loss})
            if trainer.done:
                self._succeed(spec, ev)
            else:
                self._update(spec.job_id, "running", [ev])
        return res.tokens

    def _start_next(self) -> bool:
        if not self.queue:
            return False
        spec = self.queue.popleft()
        try:
            self.trainer = Trainer(self.model_fn(), spec.examples, spec.hp)
        except Exception as exc:  # noqa: BLE001 - unsupported model, out of memory: the job fails
            msg = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            self._finish(spec.job_id, "failed", [JobEvent(f"Job failed: {msg}", "error")],
                         error={"message": msg, "code": "unsupported_model", "param": getattr(exc, "param", None)})
            return False
        self.current = spec
        t = self.trainer
        self._update(spec.job_id, "running", [JobEvent(
            f"Fine-tuning started: {t.total_steps} steps, LoRA rank {spec.hp.lora_rank} on "
            f"{', '.join(spec.hp.target_modules)} ({t.lora.num_parameters()} parameters)")])
        return True

    def _succeed(self, spec: JobSpec, last: JobEvent) -> None:
        try:
            self.trainer.lora.save_peft(spec.out_dir, spec.base_model)
        except OSError as exc:
            self._end_current("failed", [last, JobEvent(f"Cannot save the adapter: {exc}", "error")],
                              error={"message": f"cannot save the adapter: {exc}", "code": "save_error"})
            return
        self._end_current("succeeded", [last, JobEvent(f"New fine-tuned model created: {spec.fine_tuned_model}"),
                                        JobEvent("The job has successfully completed")], result_dir=spec.out_dir)

    def _end_current(self, status: str, events: list[JobEvent], error: Optional[dict] = None,
                     result_dir: Optional[str] = None) -> None:
        spec, trainer = self.current, self.trainer
        self.current, self.trainer = None, None
        trainer.release()
        self._finish(spec.job_id, status, events, error, result_dir, trainer)

    def _finish(self, job_id: str, status: str, events: list[JobEvent], error: Optional[dict] = None,
                result_dir: Optional[str] = None, trainer: Optional[Trainer] = None) -> None:
        self._update(job_id, status, events, error=error, result_dir=result_dir, finished_at=int(time.time()),
                     trainer=trainer)

    def _update(self, job_id: str, status: str, events: list[JobEvent], trainer: Optional[Trainer] = None,
                **kw: Any) -> None:
        t = trainer if trainer is not None else (self.trainer if self.current is not None
                                                 and self.current.job_id == job_id else None)
        counts = dict(trained_tokens=t.trained_tokens, steps=t.step, total_steps=t.total_steps) if t else {}
        self._updates.append(JobUpdate(job_id, status, events, **counts, **kw))


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op CPU threads set to n for the block (0: unchanged); restored after."""
    import torch

    prev = torch.get_num_threads()
    change = n > 0 and n != prev
    if change:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(prev)
