"""A request's pending output on its event loop (OutputBox), shared by the in-process AsyncEngine and the
engine-process client, and the bare "aborted" marker both deliver when a request ends without output."""
from __future__ import annotations

import asyncio
from typing import Optional

from tokenmill.outputs import CompletionOutput, RequestOutput, merge_delta_outputs
from tokenmill.sampling_params import RequestOutputKind


class OutputBox:
    """A request's pending output, on its event loop: at most one item. An output that arrives before the
    consumer took the previous one replaces it (CUMULATIVE, FINAL_ONLY) or is merged into it (DELTA),
    so a client that stops reading costs memory linear in its output, never a queue of copies."""

    def __init__(self, kind: RequestOutputKind):
        self.kind = kind
        self.item: Optional[RequestOutput] = None
        self.error: Optional[BaseException] = None
        self.ready = asyncio.Event()

    def put(self, item) -> None:
        if isinstance(item, BaseException):
            self.error = item
        elif self.item is None:
            self.item = item
        elif self.kind == RequestOutputKind.DELTA:
            self.item = merge_delta_outputs(self.item, item)
        else:
            self.item = merge_cumulative(self.item, item)
        self.ready.set()

    async def get(self) -> RequestOutput:
        await self.ready.wait()
        self.ready.clear()
        if self.item is not None:  # outputs that made it before an error still reach the consumer
            item, self.item = self.item, None
            if self.error is not None:
                self.ready.set()
            return item
        raise self.error  # type: ignore[misc]


def merge_cumulative(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """`new` (which holds everything so far) with the delta_* fields of `old` in front of its own."""
    if not new.prompt_token_ids:  # the bare "aborted" marker: keep what the consumer has not seen
        return new
    olds = {o.index: o for o in old.outputs}
    for o in new.outputs:
        prev = olds.get(o.index)
        if prev is not None:
            o.delta_text = prev.delta_text + o.delta_text
            o.delta_token_ids = list(prev.delta_token_ids) + list(o.delta_token_ids)
            if prev.delta_logprobs is not None:
                o.delta_logprobs = list(prev.delta_logprobs) + list(o.delta_logprobs or [])
    return new


def aborted_output(request_id: str) -> RequestOutput:
    return RequestOutput(request_id, None, [], [CompletionOutput(index=0, finish_reason="abort")], finished=True)
