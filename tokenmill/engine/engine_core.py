"""EngineCore: step() = schedule -> execute_model -> update_from_output."""
from __future__ import annotations

import json
import logging
import time
import traceback
from typing import Optional

from tokenmill.config import EngineConfig
from tokenmill.core.outputs import EngineCoreOutput, ModelRunnerOutput
from tokenmill.core.scheduler import Scheduler
from tokenmill.core.streaming import StreamingSpec
from tokenmill.engine.protocol import EngineStats
from tokenmill.errors import ConfigError, TokenmillError
from tokenmill.executor.base import Executor, ExecutorDeadError, ModelInfo, make_executor
from tokenmill.perf.cost_model import shape_of_schedule
from tokenmill.request import Request, RequestStatus

logger = logging.getLogger(__name__)


class EngineCore:
    """The scheduler and the executor: one process (the engine's), any number of ranks behind the executor."""

    def __init__(self, config: EngineConfig, executor: Optional[Executor] = None):
        self.config = config
        self.executor = executor if executor is not None else make_executor(config)
        self.info: Optional[ModelInfo] = None  # the executor's load handshake
        self.scheduler: Optional[Scheduler] = None
        self._trace = None  # the step trace file (scheduler.step_trace), opened by load()
        self.structured = None  # StructuredOutputs (constrained decoding), set by init_structured_outputs()
        self.moe_stats = None  # the latest MoEStats a step reported (MoE models)
        self.finetune = None  # FineTuner (tokenmill/finetune/engine.py): training between inference steps
        self.loras = None  # tokenmill.lora.registry.LoRARegistry (enable_lora), set by load()

    def load(self) -> ModelInfo:
        self.info = info = self.executor.load()
        sc, cc = self.config.scheduler, self.config.cache
        policy = None
        if sc.slo_calibration:
            from tokenmill.core.policies import make_policy_for_config
            from tokenmill.perf.cost_model import CostModel

            policy = make_policy_for_config(sc, cost_model=CostModel.load(sc.slo_calibration))
        streaming = StreamingSpec.from_tokens(cc.streaming_sink_tokens, cc.streaming_window_tokens, cc.block_size)
        self.scheduler = Scheduler(sc, info.num_kv_blocks, cc.block_size, info.max_model_len,
                                   cc.enable_prefix_caching, policy=policy,
                                   num_host_blocks=info.num_host_blocks, streaming=streaming,
                                   max_loras=self.config.lora.max_loras if self.config.lora.enable_lora else None,
                                   kv_role=self.config.kv_transfer.kv_role)
        if self.config.lora.enable_lora:
            from tokenmill.lora.adapter import read_adapter
            from tokenmill.lora.registry import LoRARegistry

            shapes, rank = info.lora_shapes, self.config.lora.max_lora_rank
            self.loras = LoRARegistry(self.config.lora.num_slots,
                                      lambda lid, name, path: read_adapter(name, path, shapes, rank))
            for i, (name, path) in enumerate(self.config.lora.parsed_modules(), start=1):  # --lora-modules
                try:
                    self.add_lora(i, name, path, read_adapter(name, path, shapes, rank))
                except TokenmillError as e:
                    raise ConfigError(f"--lora-modules {name}={path}: {e.message}", param="lora_modules") from None
        if sc.step_trace:
            self._trace = open(sc.step_trace, "a", buffering=1)  # line-buffered: whole lines survive a kill
        from tokenmill.finetune.engine import FineTuner

        fc = self.config.finetune
        self.finetune = FineTuner(self._finetune_model, fc.finetune_max_step_tokens, fc.finetune_max_step_ms,
                                  sc.max_num_batched_tokens, sc.slo_tpot_ms, threads=fc.finetune_threads)
        return info

    def _finetune_model(self):
        """The served model, for training in this process (FineTuner); refused where the ranks run elsewhere."""
        from tokenmill.finetune.lora import FineTuneUnsupported

        try:
            return self.executor.runner.model
        except AttributeError:
            raise FineTuneUnsupported("fine-tuning needs the model in the engine process (one rank, "
                                      "--tensor-parallel-size 1)", param="model") from None

    def shutdown(self) -> None:
        self.executor.shutdown()
        if self._trace is not None:
            self._trace.close()
            self._trace = None

    @property
    def runner(self):
        """The in-process ModelRunner (tests, calibration); the engine itself only talks to the executor."""
        return self.executor.runner

    def init_structured_outputs(self, tokenizer, vocab_size: int, stop_token_ids) -> None:
        """Constrained decoding over this tokenizer; `vocab_size` is the width of the model's logits."""
        from tokenmill.engine.structured_outputs import StructuredOutputs
        from tokenmill.structured.manager import StructuredOutputManager

        c = self.config.structured
        manager = StructuredOutputManager(tokenizer, vocab_size, stop_token_ids, jump_forward=c.jump_forward,
                                          cache_size=c.grammar_cache_size, num_threads=c.grammar_compile_threads)
        self.structured = StructuredOutputs(manager, self.scheduler)

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    def streaming_max_prompt_tokens(self) -> Optional[int]:
        """Longest prompt of a kv_eviction='streaming' request; None where the KV cache cannot re-rotate keys."""
        if not self.info.supports_kv_streaming:  # no RoPE, or an int8 / fp8 cache
            return None
        return self.scheduler.streaming.spec.max_prompt_tokens

    # ---- LoRA adapters (enable_lora) ----------------------------------------------------------------
    def add_lora(self, lora_id: int, name: str, path: str, weights) -> bool:
        """Register an adapter read by tokenmill.lora.adapter.read_adapter; False if the id is taken."""
        return self.loras.add(lora_id, name, path, weights, self.scheduler.lora_in_use)

    def remove_lora(self, lora_id: int) -> bool:
        """Drop an adapter; LoRAInUseError (409) while requests of it are unfinished; False if unknown."""
        return self.loras.remove(lora_id, self.scheduler.lora_in_use)

    def list_loras(self) -> set[int]:
        return set(self.loras.adapters) if self.loras is not None else set()

    def add_request(self, req: Request) -> None:
        if req.lora_int_id:
            if self.loras is None:
                from tokenmill.errors import InvalidRequestError

                raise InvalidRequestError("LoRA adapters need enable_lora", param="model")
            self.loras.ensure_resident(req.lora_int_id, self.scheduler.lora_in_use)
        self.scheduler.add_request(req)
        if self.structured is not None:
            self.structured.add_request(req)

    def abort_requests(self, request_ids, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        done = self.scheduler.abort_requests(request_ids, status)
        if self.structured is not None:
            self.structured.remove(r.request_id for r in done)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def take_ready_outputs(self) -> list[EngineCoreOutput]:
        """Outputs known without a step: the producer's first tokens of requests just added to a consumer
        (disaggregated decode); the engine loops send them right after adding requests."""
        return self.scheduler.take_first_token_outputs()

    def has_training(self) -> bool:
        """A fine-tuning job is queued or running: step() trains when there is no request to serve."""
        return self.finetune is not None and self.finetune.has_work()

    def step(self) -> list[EngineCoreOutput]:
        if self.finetune is not None and self.finetune.has_work():
            return self._step_with_training()
        errors = self.structured.take_errors() if self.structured is not None else []  # grammars that failed
        if self._trace is None:
            return errors + self._run(self.scheduler.schedule())
        wall, t0 = time.time(), time.perf_counter()
        sched = self.scheduler.schedule()
        out = self._run(sched)
        _write_trace(self._trace, wall, time.perf_counter() - t0, sched)
        return errors + out

    def _step_with_training(self) -> list[EngineCoreOutput]:
        """An inference step (when there is work), then what it leaves to fine-tuning (tokenmill/finetune)."""
        from tokenmill.finetune.engine import StepUsage

        if not self.scheduler.has_work():
            self.finetune.train(None)  # no traffic: one time-bounded chunk, then the loop looks for requests
            return []
        errors = self.structured.take_errors() if self.structured is not None else []
        wall, t0 = time.time(), time.perf_counter()
        sched = self.scheduler.schedule()
        out = self._run(sched)
        seconds = time.perf_counter() - t0
        if self._trace is not None:
            _write_trace(self._trace, wall, seconds, sched)
        self.finetune.train(StepUsage(seconds, sched.total_num_scheduled_tokens, self.scheduler.num_waiting))
        return errors + out

    def _run(self, sched) -> list[EngineCoreOutput]:
        if self.loras is not None:
            self.loras.attach(sched)
        if self.structured is None:
            return self._execute(sched)
        if sched.total_num_scheduled_tokens == 0:  # only requests whose grammar compiles: wait for one
            self.structured.manager.wait_for_compile(0.05)
        self.structured.before_run(sched)  # grammar bitmask, jump-forward tokens
        outs = self._execute(sched)
        self.structured.after_run(outs)
        return outs

    def _execute(self, sched) -> list[EngineCoreOutput]:
        """execute_model -> update_from_output for one schedule."""
        if sched.total_num_scheduled_tokens == 0 and not (sched.finished_req_ids or sched.kv_swap_out or sched.kv_swap_in
                                                          or sched.lora_loads or sched.lora_unloads
                                                          or sched.kv_transfer is not None):
            # nothing to run, but requests finished inside schedule() (rejected, length-capped) still report
            return self.scheduler.update_from_output(sched, ModelRunnerOutput(req_ids=[], sampled_token_ids=[],
                                                                              logprobs=[]))
        try:
            result = self.executor.execute_model(sched)
        except ExecutorDeadError:
            raise  # a lost rank: no later step can run either
        except Exception as exc:  # a failed step fails only the requests in it
            logger.error("step failed: %s\n%s", exc, traceback.format_exc())
            msg = f"internal error while running the model: {type(exc).__name__}: {exc}"
            ids = list(sched.num_scheduled_tokens)
            result = ModelRunnerOutput(req_ids=ids, sampled_token_ids=[[] for _ in ids],
                                       logprobs=[None for _ in ids], errors={i: msg for i in ids})
            # the runner's state for them may be half-updated: the scheduler finishes them with an error, and
            # the next schedule's finished_req_ids tells every rank to drop it
        if result.moe_stats is not None:
            self.moe_stats = result.moe_stats
        return self.scheduler.update_from_output(sched, result)

    def stats(self) -> EngineStats:
        s = self.scheduler
        kv = s.kv
        return EngineStats(num_running=s.num_running, num_waiting=s.num_waiting,
                           kv_blocks_total=kv.num_total_blocks, kv_blocks_used=kv.num_used_blocks,
                           prefix_cache_queries=kv.prefix_queries, prefix_cache_hits=kv.prefix_hits,
                           num_preemptions=s.num_preemptions, prompt_tokens=s.num_prompt_tokens_computed,
                           generation_tokens=s.num_generated_tokens, steps=s.num_steps,
                           last_step_time=time.monotonic(), moe=self.moe_stats, kv_transfer_sent=s.kv_transfer.num_sent,
                           kv_transfer_recv_ok=s.kv_transfer.num_recv_ok,
                           kv_transfer_recv_failed=s.kv_transfer.num_recv_failed, **_offload_stats(kv.offload),
                           **self._lora_stats())

    def _lora_stats(self) -> dict:
        """Per-adapter counters for EngineStats (empty without enable_lora)."""
        if self.loras is None:
            return {}
        s, name = self.scheduler, self.loras.name_of
        runner = getattr(self.executor, "_runner", None)
        lora_rt = getattr(runner, "lora", None)
        return dict(lora_requests={name(i): n for i, n in s.lora_requests.items()},
                    lora_generation_tokens={name(i): n for i, n in s.lora_generated_tokens.items()},
                    lora_unfused_steps=lora_rt.unfused_steps if lora_rt is not None else 0,
                    lora_reloads=self.loras.num_reloads)


def _write_trace(f, wall: float, seconds: float, sched) -> None:
    """One line of the step trace; steps that ran nothing are left out."""
    if not sched.total_num_scheduled_tokens:
        return
    sh = shape_of_schedule(sched)
    f.write(json.dumps({"t": round(wall, 6), "s": round(seconds, 6), "tokens": sh.num_tokens, "reqs": sh.num_reqs,
                        "kv": sh.kv_tokens_read, "pairs": sh.attn_pairs}) + "\n")


def _offload_stats(offload) -> dict:
    """The CPU offload tier's counters for EngineStats (zeros without the tier)."""
    if offload is None:
        return {}
    return dict(kv_offload_swapped_out_blocks=offload.num_swapped_out_blocks,
                kv_offload_swapped_in_blocks=offload.num_swapped_in_blocks,
                kv_offload_prefix_hits=offload.num_prefix_hit_tokens)
