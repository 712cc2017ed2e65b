"""The scheduler: one token-budget loop over running, then waiting requests.

Each step a request gets min(budget, num_tokens + num_spec_tokens - num_computed_tokens) tokens:
prefill, chunked prefill, decode, prefix hits, recompute after preemption and speculative tokens
are all this one rule. When blocks run out, the policy's victim is preempted (its KV freed, to be
recomputed later; or swapped out to the CPU offload tier, core/offload.py, when it has room).
Pure Python over ints: no torch.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

from tokenmill.config import SchedulerConfig
from tokenmill.core.kv_cache_manager import KVCacheManager, cdiv
from tokenmill.core.kv_transfer import KVTransferTracker, RemotePrefill
from tokenmill.core.outputs import (CachedRequestData, EngineCoreOutput, ModelRunnerOutput, NewRequestData,
                                    SchedulerOutput)
from tokenmill.core.policies import Policy, make_policy_for_config
from tokenmill.core.streaming import StreamingSpec, StreamingTracker, is_streaming
from tokenmill.errors import SLO_REJECTED_MESSAGE, EngineOverloadedError, InvalidRequestError, PromptTooLongError
from tokenmill.request import Request, RequestStatus


class Scheduler:
    def __init__(self, config: SchedulerConfig, num_blocks: int, block_size: int, max_model_len: int,
                 enable_prefix_caching: bool = True, policy: Optional[Policy] = None,
                 clock: Callable[[], float] = time.monotonic, num_host_blocks: int = 0,
                 streaming: Optional[StreamingSpec] = None, max_loras: Optional[int] = None,
                 kv_role: Optional[str] = None):
        self.max_model_len = max_model_len
        # multi-LoRA: at most this many distinct adapters among running requests, hence in one step (None: no LoRA)
        self.max_loras = max_loras
        self.lora_requests: dict[int, int] = {}  # adapter id -> requests added (cumulative)
        self.lora_generated_tokens: dict[int, int] = {}  # adapter id -> tokens generated (cumulative)
        self.block_size = block_size
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching, num_host_blocks)
        # kv_eviction="streaming" requests (sizes from CacheConfig.streaming_*_tokens)
        self.streaming = StreamingTracker(streaming or StreamingSpec.from_tokens(4, 1024, block_size))
        self.kv.streaming = self.streaming
        self.policy = policy or make_policy_for_config(config)
        self.config = self.policy.adjust_config(config)  # e.g. the slo policy's long-prefill cap
        self.clock = clock
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._in_runner: set[str] = set()  # requests the model runner holds state for
        self._finished_for_runner: set[str] = set()
        self._length_capped: list[Request] = []  # finished in schedule() for want of memory
        self._rejected: list[Request] = []  # refused in schedule() by the policy (slo_reject)
        # a waiting request this returns False for is passed over (its grammar is still compiling); None: all ready
        self.is_ready: Optional[Callable[[Request], bool]] = None
        # disaggregated prefill / decode (core/kv_transfer.py): KVTransferConfig.kv_role, None: off
        self.kv_transfer = KVTransferTracker(kv_role, block_size)
        # cumulative statistics
        self.num_preemptions = 0
        self.num_prompt_tokens_computed = 0
        self.num_generated_tokens = 0
        self.num_steps = 0

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        limit = self.config.max_waiting_requests
        if limit is not None and self.num_queued >= limit:
            raise EngineOverloadedError(f"too many waiting requests ({self.num_queued}); try again later")
        if is_streaming(req):
            self._check_streaming(req)
        elif not self.kv.can_fit(req.num_tokens + 1):
            raise PromptTooLongError(
                f"prompt of {req.num_prompt_tokens} tokens does not fit in the KV cache "
                f"({self.kv.num_total_blocks * self.block_size} tokens); raise num_kv_blocks or kv_cache_memory")
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        remote = self.kv_transfer.check(req)  # InvalidRequestError when it does not fit this instance's role
        self.requests[req.request_id] = req
        if req.lora_int_id:
            self.lora_requests[req.lora_int_id] = self.lora_requests.get(req.lora_int_id, 0) + 1
        if remote is not None:
            self.kv_transfer.remote[req.request_id] = remote
        self.policy.on_arrival(req)
        if isinstance(remote, RemotePrefill):  # its first token came from the producer: report it now
            req.status = RequestStatus.WAITING_FOR_REMOTE_KV
            req.first_token_time = self.clock()
            _, status, stop_reason = self._append_and_check(req, [remote.first_token_id])
            self.kv_transfer.first.append((req, remote.first_token_id, status, stop_reason))
            if status is not None:
                self._finish(req, status)
                return
        self.waiting.append(req)

    def _check_streaming(self, req: Request) -> None:
        spec = self.streaming.spec
        if req.num_tokens > spec.max_prompt_tokens:
            raise PromptTooLongError(
                f"prompt of {req.num_prompt_tokens} tokens is longer than a kv_eviction='streaming' request keeps "
                f"({spec.max_prompt_tokens}: streaming_sink_tokens + streaming_window_tokens)", param="prompt")
        if spec.max_cache_tokens > self.max_model_len or not self.kv.can_fit(spec.max_cache_tokens):
            raise InvalidRequestError(
                f"kv_eviction='streaming' needs {spec.max_cache_tokens} cache positions (sinks + window + one "
                f"block), more than max_model_len {self.max_model_len} or the KV cache", param="kv_eviction")

    def abort_requests(self, request_ids: Iterable[str],
                       status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> list[Request]:
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req.request_id in self.kv_transfer.recving:  # the connector may be writing its blocks
                self.kv_transfer.abort_recv(req)
                req.status = status  # its blocks are freed when the connector reports (update_from_output)
                self.requests.pop(req.request_id, None)
                self.policy.on_finish(req)
                done.append(req)
                continue
            if req in self.waiting:
                self.waiting.remove(req)
                if req.status == RequestStatus.WAITING_FOR_REMOTE_KV:  # not pulled: tell the producer to let go
                    self.kv_transfer.start_recv(req, req.num_prompt_tokens, [])
            elif req in self.running:
                self.running.remove(req)
            elif req in self.kv_transfer.ready:
                self.kv_transfer.ready.remove(req)
            self._finish(req, status)
            done.append(req)
        return done

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        # a producer's prefilled request keeps its blocks until the consumer has them (core/kv_transfer.py)
        if not self.kv_transfer.hold_for_send(req, self.kv.block_ids(req.request_id)):
            self.kv.free(req)
        self.kv_transfer.remote.pop(req.request_id, None)
        self.streaming.drop(req)
        self.requests.pop(req.request_id, None)
        if req.request_id in self._in_runner:
            self._in_runner.discard(req.request_id)
            self._finished_for_runner.add(req.request_id)
        self.policy.on_finish(req)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.preempt(req)  # swapped out to the CPU offload tier when it has room
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._in_runner.discard(req.request_id)
        self.waiting.append(req)

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_queued(self) -> int:
        """Waiting requests beyond the free seats (max_num_seqs - running): those the next schedule() cannot
        admit. What max_waiting_requests limits; requests about to take a free seat do not count."""
        return max(0, len(self.waiting) - max(0, self.config.max_num_seqs - len(self.running)))

    @property
    def num_running(self) -> int:
        return len(self.running)

    def lora_in_use(self, lora_int_id: int) -> bool:
        """Whether an unfinished request runs with this adapter."""
        return any(r.lora_int_id == lora_int_id for r in self.requests.values())

    def _lora_blocked(self, req: Request, loras: set[int]) -> bool:
        """Whether req's adapter would make `loras` exceed max_loras."""
        lid = req.lora_int_id
        return bool(lid) and self.max_loras is not None and lid not in loras and len(loras) >= self.max_loras

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self.kv_transfer.num_seated)

    def has_work(self) -> bool:
        return self.has_unfinished_requests() or bool(self._finished_for_runner or self._rejected
                                                          or self._length_capped) or self.kv_transfer.busy

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        cfg = self.config
        budget = self.policy.step_token_budget(self.running, cfg.max_num_batched_tokens, now)
        self.running = self.policy.order_running(self.running, now)
        out = SchedulerOutput()
        preempted: list[Request] = []
        num_long = 0

        # 1. running requests, in the policy's order (admission order by default; prefills it defers wait for step 3)
        deferred: list[Request] = []
        step_loras: set[int] = set()  # adapters in this step
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if self._lora_blocked(req, step_loras):
                i += 1
                continue
            streaming = is_streaming(req)
            if streaming:  # counted in its cache; max_model_len does not cap it, its cache size does
                remaining, cap = self.streaming.remaining(req), self.streaming.cap(req)
            else:
                remaining = req.num_tokens - req.num_computed_tokens  # known tokens not yet computed
                cap = self.max_model_len - req.num_computed_tokens
            if remaining > 1 and self.policy.defer_prefill(req, now):
                deferred.append(req)
                i += 1
                continue
            n = min(remaining + len(req.spec_token_ids), budget, cap)
            n, num_long = self._cap_long_prefill(remaining, n, num_long)
            if n <= 0:
                i += 1
                continue
            if streaming:
                out.kv_streaming[req.request_id] = self.streaming.evict(self.kv, req, n)
            elif not self.kv.can_fit(req.num_computed_tokens + n):
                # even the whole cache cannot hold it: end it rather than preempt forever
                self.running.pop(i)
                self._finish(req, RequestStatus.FINISHED_LENGTH)
                self._length_capped.append(req)
                continue
            new_blocks = self.kv.allocate_slots(req, n)
            while new_blocks is None:
                victim = max(self.running[i:], key=lambda r: self.policy.victim_key(r, now))
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
                new_blocks = self.kv.allocate_slots(req, n)
            if new_blocks is None:
                continue  # req itself was preempted; running[i] is now the next request
            num_spec = max(0, n - remaining)
            if num_spec:
                out.scheduled_spec_decode_tokens[req.request_id] = req.spec_token_ids[:num_spec]
            out.scheduled_cached_reqs.append(CachedRequestData(req.request_id, new_blocks, req.num_computed_tokens))
            self._account(out, req, n)
            budget -= n
            i += 1
            if req.lora_int_id:
                step_loras.add(req.lora_int_id)

        # 1b. consumer requests whose KV has arrived (or is to be recomputed): they hold their seats and blocks
        budget, num_long = self._schedule_kv_ready(out, budget, num_long, now)

        # 2. waiting requests, unless this step had to preempt (memory is tight)
        if not preempted and self.waiting:
            if self.policy.rejects_requests:
                for req in [r for r in self.waiting if self.policy.should_reject(r, now)]:
                    self.waiting.remove(req)
                    self._finish(req, RequestStatus.FINISHED_ABORTED)
                    req.error = SLO_REJECTED_MESSAGE
                    self._rejected.append(req)
            self.waiting = self.policy.order_waiting(self.waiting, now)
            j = 0
            while j < len(self.waiting) and budget > 0 and \
                    len(self.running) + self.kv_transfer.num_seated < cfg.max_num_seqs:
                self._prefer_cached_prefix(j)
                req = self.waiting[j]
                if self.is_ready is not None and not self.is_ready(req):
                    j += 1
                    continue
                if self._lora_blocked(req, {r.lora_int_id for r in self.running if r.lora_int_id}):
                    j += 1  # its adapter waits for one of the running ones to drain
                    continue
                hits, num_hit = self.kv.get_computed_blocks(req)
                if req.status == RequestStatus.WAITING_FOR_REMOTE_KV:  # blocks for the prompt, then the pull
                    if not self._admit_remote(req, hits, num_hit, now):
                        break  # no room: stop admitting
                    self.waiting.pop(j)
                    continue
                num_host = self.kv.get_offloaded_hit_tokens(req, len(hits))  # restored by swap-in
                num_hit += num_host
                remaining = req.num_tokens - num_hit
                budget_n = budget
                if is_streaming(req):  # resumed after evictions: sinks + window only, in its cache
                    remaining = self.streaming.to_cache(req, req.num_tokens) - num_hit
                    budget_n = min(budget, self.streaming.spec.max_cache_tokens - num_hit)
                n, num_long = self._cap_long_prefill(remaining, min(remaining, budget_n), num_long)
                if n <= 0:
                    j += 1
                    continue
                new_blocks = self.kv.allocate_slots(req, n, hits, num_offloaded_tokens=num_host)
                if new_blocks is None:
                    break  # no room: stop admitting
                self.kv.record_prefix_lookup(req.num_tokens, num_hit)
                self.waiting.pop(j)
                req.num_computed_tokens = self.streaming.to_text(req, num_hit) if is_streaming(req) else num_hit
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_hit
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                self._in_runner.add(req.request_id)
                out.scheduled_new_reqs.append(NewRequestData(
                    req.request_id, req.prompt_token_ids, list(req.output_token_ids), req.sampling_params,
                    self.kv.block_ids(req.request_id), num_hit, req.eos_token_ids, req.lora_int_id))
                self._account(out, req, n)
                budget -= n
                if req.lora_int_id:
                    step_loras.add(req.lora_int_id)

        # 3. deferred prefills take what budget is left (no preemption on their behalf)
        for req in deferred:
            if budget <= 0 or req not in self.running:
                break
            if self._lora_blocked(req, step_loras):
                continue
            remaining = req.num_tokens - req.num_computed_tokens
            n, num_long = self._cap_long_prefill(remaining, min(remaining, budget), num_long)
            new_blocks = self.kv.allocate_slots(req, n) if n > 0 else None
            if new_blocks is None:
                continue
            out.scheduled_cached_reqs.append(CachedRequestData(req.request_id, new_blocks, req.num_computed_tokens))
            self._account(out, req, n)
            budget -= n
            if req.lora_int_id:
                step_loras.add(req.lora_int_id)

        out.preempted_req_ids = {r.request_id for r in preempted}
        for req_id in list(out.kv_streaming):
            if req_id in out.preempted_req_ids:
                del out.kv_streaming[req_id]  # its blocks are gone: nothing to shift
        for new in out.scheduled_new_reqs:  # admitted (or resumed) streaming requests: no eviction, just E
            if is_streaming(r := self.requests[new.req_id]):
                out.kv_streaming[new.req_id] = self.streaming.step_info(r)
        out.kv_transfer = self.kv_transfer.take_step()
        out.finished_req_ids = self._finished_for_runner | out.preempted_req_ids
        self._finished_for_runner = set()
        if self.kv.offload is not None:
            out.kv_swap_out, out.kv_swap_in = self.kv.offload.take_swaps()
        # advance at schedule time; rejected speculative tokens are taken back in update_from_output
        for req_id, n in out.num_scheduled_tokens.items():
            if req_id in out.kv_streaming:
                self.streaming.advance(self.requests[req_id], n)
            else:
                self.requests[req_id].num_computed_tokens += n
        self.num_steps += 1
        return out

    def _admit_remote(self, req: Request, hits: list, num_hit: int, now: float) -> bool:
        """A consumer's request: blocks for its whole prompt (local prefix hits first, the new ones left out of
        the prefix cache until their KV arrives), then the connector pulls the rest. False: no room."""
        n = req.num_prompt_tokens - num_hit
        if self.kv.allocate_slots(req, max(0, n), hits, cache=False) is None:
            return False
        self.kv.record_prefix_lookup(req.num_prompt_tokens, num_hit)
        req.num_cached_tokens = num_hit
        if req.first_scheduled_time is None:
            req.first_scheduled_time = now
        # (with the whole prompt cached here the pull asks for no block: it only lets the producer free its own)
        self.kv_transfer.start_recv(req, num_hit, self.kv.block_ids(req.request_id))
        return True

    def _schedule_kv_ready(self, out: SchedulerOutput, budget: int, num_long: int, now: float) -> tuple[int, int]:
        ready = self.kv_transfer.ready
        while ready and budget > 0:
            req = ready[0]
            remaining = req.num_tokens - req.num_computed_tokens
            n, num_long = self._cap_long_prefill(remaining, min(remaining, budget), num_long)
            if n <= 0 or self.kv.allocate_slots(req, n) is None:
                break
            ready.pop(0)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._in_runner.add(req.request_id)
            out.scheduled_new_reqs.append(NewRequestData(
                req.request_id, req.prompt_token_ids, list(req.output_token_ids), req.sampling_params,
                self.kv.block_ids(req.request_id), req.num_computed_tokens, req.eos_token_ids))
            self._account(out, req, n)
            budget -= n
        return budget, num_long

    def _apply_kv_transfer(self, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """The connector's reports: free sent blocks; pulled requests become ready (KV in place or recompute);
        and the first tokens of newly added consumer requests."""
        kt = self.kv_transfer
        for req_id in result.kv_sent:
            req = kt.finish_send(req_id)
            if req is not None:
                self.kv.free(req)
        for req_id, ok in result.kv_recved.items():
            entry = kt.finish_recv(req_id, ok)
            if entry is None:
                continue
            req, num_hit = entry
            if req.is_finished:  # aborted during the pull
                self.kv.free(req)
                continue
            if ok:
                req.num_computed_tokens = req.num_prompt_tokens
                self.kv.cache_blocks(req, req.num_prompt_tokens)
            else:  # recompute the prompt after the local hits (the new blocks were never cached)
                req.num_computed_tokens = num_hit
            kt.ready.append(req)
        return self.take_first_token_outputs()

    def take_first_token_outputs(self) -> list[EngineCoreOutput]:
        """The producer's first tokens of consumer requests added since the last call. The engine loops report
        them as soon as they add the requests (between steps), not after the step that follows: that step, a
        whole decode step of the other requests, would sit on the request's time to first token."""
        outs = []
        for req, token, status, stop_reason in self.kv_transfer.take_first():
            outs.append(EngineCoreOutput(req.request_id, [token],
                                         finish_reason=req.finish_reason.value if status is not None else None,
                                         stop_reason=stop_reason, first_scheduled_time=req.first_scheduled_time))
            self.num_generated_tokens += 1
        return outs

    def _cap_long_prefill(self, remaining: int, n: int, num_long: int) -> tuple[int, int]:
        """A long prefill (over the threshold) runs in threshold-sized chunks, and at most
        max_long_partial_prefills of them per step. Returns (tokens, long prefills so far); 0 = wait."""
        threshold = self.config.long_prefill_token_threshold
        if not threshold or remaining <= threshold:
            return n, num_long
        if num_long >= self.config.max_long_partial_prefills:
            return 0, num_long
        return min(n, threshold), num_long + 1

    def _prefer_cached_prefix(self, j: int) -> None:
        """Prefix-aware admission (where the policy has prefix_aware_admission: fcfs): move to position j the
        request, among the next `prefix_aware_window` waiting ones, with the longest cached prefix, so cached
        blocks are used before they are evicted. A request passed over `prefix_aware_max_skips` times goes first."""
        window = self.config.prefix_aware_window
        if window <= 1 or not self.policy.prefix_aware_admission or not self.kv.enable_caching:
            return
        cands = self.waiting[j:j + window]
        if len(cands) < 2 or cands[0].num_skips >= self.config.prefix_aware_max_skips:
            return
        best = max(range(len(cands)), key=lambda k: (self.kv.get_computed_blocks(cands[k])[1], -k))
        if best:
            for r in cands[:best]:
                r.num_skips += 1
            self.waiting.insert(j, self.waiting.pop(j + best))

    def _account(self, out: SchedulerOutput, req: Request, n: int) -> None:
        out.num_scheduled_tokens[req.request_id] = n
        out.total_num_scheduled_tokens += n
        self.num_prompt_tokens_computed += max(0, min(n, req.num_prompt_tokens - req.num_computed_tokens))
        self.policy.on_scheduled(req, n)

    # ---- results -------------------------------------------------------------------------------
    def update_from_output(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        now = self.clock()
        if self.kv.offload is not None:
            self.kv.offload.end_step()  # the runner has done this step's copies
        outputs: list[EngineCoreOutput] = [EngineCoreOutput(r.request_id, [], finish_reason="length")
                                           for r in self._length_capped]
        outputs += self._apply_kv_transfer(result)
        self._length_capped = []
        outputs += [EngineCoreOutput(r.request_id, [], finish_reason="error", error=r.error)
                    for r in self._rejected]
        self._rejected = []
        for idx, req_id in enumerate(result.req_ids):
            req = self.requests.get(req_id)
            if req is None or req.is_finished:
                continue
            if req_id in result.errors:
                self.running.remove(req)
                self._finish(req, RequestStatus.FINISHED_ERROR)
                req.error = result.errors[req_id]
                outputs.append(EngineCoreOutput(req_id, [], finish_reason="error", error=req.error))
                continue
            tokens = result.sampled_token_ids[idx]
            spec = sched.scheduled_spec_decode_tokens.get(req_id)
            if spec and tokens:
                req.num_computed_tokens -= len(spec) + 1 - len(tokens)
            req.spec_token_ids = []
            logprobs = result.logprobs[idx] if idx < len(result.logprobs) else None
            kept, status, stop_reason = self._append_and_check(req, tokens)
            if kept and req.first_token_time is None:
                req.first_token_time = now
            if kept:
                self.num_generated_tokens += len(kept)
                if req.lora_int_id:
                    self.lora_generated_tokens[req.lora_int_id] = \
                        self.lora_generated_tokens.get(req.lora_int_id, 0) + len(kept)
                self.policy.on_output(req, len(kept))
            if status is not None:
                self.running.remove(req)
                self._finish(req, status)
            elif result.draft_token_ids.get(req_id):
                room = req.max_tokens - req.num_output_tokens - 1
                if not is_streaming(req):
                    room = min(room, self.max_model_len - req.num_tokens - 1)
                req.spec_token_ids = result.draft_token_ids[req_id][:max(0, room)]
            plp = result.prompt_logprobs.get(req_id)
            if kept or status is not None or plp:
                outputs.append(EngineCoreOutput(
                    req_id, kept, logprobs[:len(kept)] if logprobs else None,
                    req.finish_reason.value if status is not None else None, stop_reason, plp,
                    first_scheduled_time=req.first_scheduled_time, num_cached_tokens=max(0, req.num_cached_tokens)))
        return outputs

    def _append_and_check(self, req: Request, tokens: list[int]):
        """Append sampled tokens one by one until a stop condition; returns (kept, status, reason)."""
        p = req.sampling_params
        kept: list[int] = []
        for t in tokens:
            req.append_output_token_ids([t])
            kept.append(t)
            n_out = req.num_output_tokens
            if n_out > p.min_tokens:
                if not p.ignore_eos and t in req.eos_token_ids:
                    return kept, RequestStatus.FINISHED_STOPPED, None
                if t in p.stop_token_ids:
                    return kept, RequestStatus.FINISHED_STOPPED, t
            if n_out >= req.max_tokens or (req.num_tokens >= self.max_model_len and not is_streaming(req)):
                return kept, RequestStatus.FINISHED_LENGTH, None
        return kept, None, None

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish from outside (stop strings matched by the detokenizer, client aborts)."""
        self.abort_requests(request_ids, status)
