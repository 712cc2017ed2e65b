"""EngineCore: step() = schedule -> execute_model -> update_from_output."""
from __future__ import annotations

import logging
import time
import traceback
from typing import Optional

from tokenmill.config import EngineConfig
from tokenmill.core.outputs import EngineCoreOutput, ModelRunnerOutput
from tokenmill.core.scheduler import Scheduler
from tokenmill.core.streaming import StreamingSpec
from tokenmill.engine.protocol import EngineStats
from tokenmill.request import Request, RequestStatus

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, runner=None):
        from tokenmill.worker.model_runner import ModelRunner

        self.config = config
        self.runner = runner if runner is not None else ModelRunner(config)
        self.scheduler: Optional[Scheduler] = None

    def load(self) -> None:
        if self.runner.model is None:
            self.runner.load()
        cc = self.config.cache
        streaming = StreamingSpec.from_tokens(cc.streaming_sink_tokens, cc.streaming_window_tokens, cc.block_size)
        self.scheduler = Scheduler(self.config.scheduler, self.runner.num_blocks, cc.block_size,
                                   self.runner.max_model_len, cc.enable_prefix_caching, streaming=streaming)

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    def add_request(self, req: Request) -> None:
        self.scheduler.add_request(req)

    def abort_requests(self, request_ids, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        self.scheduler.abort_requests(request_ids, status)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        if sched.total_num_scheduled_tokens == 0 and not sched.finished_req_ids:
            return []
        try:
            result = self.runner.execute_model(sched)
        except Exception as exc:  # a failed step fails only the requests in it
            logger.error("step failed: %s\n%s", exc, traceback.format_exc())
            msg = f"internal error while running the model: {type(exc).__name__}: {exc}"
            ids = list(sched.num_scheduled_tokens)
            result = ModelRunnerOutput(req_ids=ids, sampled_token_ids=[[] for _ in ids],
                                       logprobs=[None for _ in ids], errors={i: msg for i in ids})
            for rid in ids:  # the runner's state for them may be half-updated: drop it
                self.runner.states.pop(rid, None)
        return self.scheduler.update_from_output(sched, result)

    def stats(self) -> EngineStats:
        s = self.scheduler
        kv = s.kv
        return EngineStats(num_running=s.num_running, num_waiting=s.num_waiting,
                           kv_blocks_total=kv.num_total_blocks, kv_blocks_used=kv.num_used_blocks,
                           prefix_cache_queries=kv.prefix_queries, prefix_cache_hits=kv.prefix_hits,
                           num_preemptions=s.num_preemptions, prompt_tokens=s.num_prompt_tokens_computed,
                           generation_tokens=s.num_generated_tokens, steps=s.num_steps,
                           last_step_time=time.monotonic())
