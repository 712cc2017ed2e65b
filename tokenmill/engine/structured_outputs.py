"""EngineCore's side of constrained decoding: around each step, between the scheduler and the runner.

before_run: the grammar bitmask of the scheduled constrained requests (one row per position they sample or
verify) and the jump-forward tokens the runner has not seen yet go into the SchedulerOutput.
after_run: each matcher advances by the tokens the scheduler kept; a terminated grammar finishes the request
("stop"); forced tokens are appended to the request as output tokens not yet computed (the next step computes
them like prompt tokens and samples the token after them); drafts are cut to what the grammar accepts.
The scheduler only sees `Scheduler.is_ready` (False while a request's grammar compiles).
"""
from __future__ import annotations

from typing import Iterable

from tokenmill.core.outputs import EngineCoreOutput, SchedulerOutput
from tokenmill.core.scheduler import Scheduler
from tokenmill.core.streaming import is_streaming
from tokenmill.request import Request, RequestStatus
from tokenmill.structured.manager import StructuredOutputManager


class StructuredOutputs:
    def __init__(self, manager: StructuredOutputManager, scheduler: Scheduler):
        self.manager = manager
        self.scheduler = scheduler
        self._pending_forced: dict[str, list[int]] = {}  # jump-forward tokens the runner has not seen
        scheduler.is_ready = self._is_ready

    def _is_ready(self, req: Request) -> bool:
        return self.manager.is_ready(req.request_id)

    def add_request(self, req: Request) -> None:
        so = req.sampling_params.structured_outputs
        if so is not None:
            self.manager.add_request(req.request_id, so)

    def remove(self, request_ids: Iterable[str]) -> None:
        ids = list(request_ids)
        self.manager.remove(ids)
        for rid in ids:
            self._pending_forced.pop(rid, None)

    def take_errors(self) -> list[EngineCoreOutput]:
        """Finish (finish_reason "error") the requests whose grammar failed to compile."""
        outs = []
        for rid, msg in self.manager.take_errors():
            for req in self.scheduler.abort_requests([rid], RequestStatus.FINISHED_ERROR):
                req.error = msg
                outs.append(EngineCoreOutput(rid, [], finish_reason="error", error=msg))
        return outs

    def before_run(self, sched: SchedulerOutput) -> None:
        if self._pending_forced:
            new_ids = {n.req_id for n in sched.scheduled_new_reqs}
            cached_ids = {c.req_id for c in sched.scheduled_cached_reqs}
            for rid in list(self._pending_forced):
                if rid in new_ids or rid not in self.scheduler.requests:  # resumed: its state is rebuilt in full
                    del self._pending_forced[rid]
                elif rid in cached_ids:
                    sched.forced_token_ids[rid] = self._pending_forced.pop(rid)
        rows = [(rid, sched.scheduled_spec_decode_tokens.get(rid, ())) for rid in sched.num_scheduled_tokens
                if rid in self.manager and self.manager.is_ready(rid)]
        if rows:
            sched.grammar_bitmask, sched.grammar_rows = self.manager.fill_bitmask(rows)

    def after_run(self, outputs: list[EngineCoreOutput]) -> None:
        m = self.manager
        for o in outputs:
            rid = o.req_id
            if rid not in m:
                continue
            if o.finished:
                self.remove([rid])
                continue
            req = self.scheduler.requests.get(rid)
            if req is None or not o.new_token_ids:
                continue
            if not m.accept_tokens(rid, o.new_token_ids):
                self._finish(req, o, RequestStatus.FINISHED_ERROR, "the sampled token does not fit the grammar "
                             "(a grammar that must end while min_tokens bans its end?)")
                continue
            if m.is_terminated(rid):  # its stop token was accepted (ignore_eos kept the request running)
                self._finish(req, o, RequestStatus.FINISHED_STOPPED)
                continue
            p = req.sampling_params
            if p.logprobs is None:  # forced tokens have no sampled logprobs to report
                forced = m.jump_forward(rid, self._room(req), exclude=p.stop_token_ids)
                if forced:
                    req.append_output_token_ids(forced)
                    self.scheduler.num_generated_tokens += len(forced)
                    o.new_token_ids = list(o.new_token_ids) + forced
                    self._pending_forced.setdefault(rid, []).extend(forced)
                    spec = req.spec_token_ids
                    req.spec_token_ids = spec[len(forced):] if spec[:len(forced)] == forced else []
            drafts = m.forced_drafts(rid, self._room(req), exclude=p.stop_token_ids)  # "draft" mode
            if drafts:  # verified next step like speculative drafts (replacing the n-gram proposer's)
                req.spec_token_ids = drafts
            elif req.spec_token_ids:
                req.spec_token_ids = m.valid_draft_prefix(rid, req.spec_token_ids)[:max(0, self._room(req))]

    def _room(self, req: Request) -> int:
        """Tokens that may still be appended without sampling, leaving one to sample (as the scheduler does
        for drafts: max_tokens, and max_model_len outside kv_eviction="streaming")."""
        room = req.max_tokens - req.num_output_tokens - 1
        if not is_streaming(req):
            room = min(room, self.scheduler.max_model_len - req.num_tokens - 1)
        return room

    def _finish(self, req: Request, o: EngineCoreOutput, status: RequestStatus, error: str | None = None) -> None:
        self.scheduler.finish_requests([req.request_id], status)
        req.error = error
        o.finish_reason = req.finish_reason.value
        o.error = error
        self.remove([req.request_id])
