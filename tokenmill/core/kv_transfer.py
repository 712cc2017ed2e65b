"""Disaggregated prefill / decode: the scheduler's side of KV transfer (pure Python, no torch).

A request reaches a producer (prefill instance) with `kv_transfer_params = {"do_remote_decode": true,
"transfer_id": T}` and max_tokens 1. When it finishes, its blocks are not freed: they are held for the
consumer (`sending`), listed once in the next SchedulerOutput's `kv_transfer.send`, and freed when the
runner's KV connector reports them sent, or given up after its timeout (`ModelRunnerOutput.kv_sent`).

The same request then reaches a consumer (decode instance) with the producer's answer, `kv_transfer_params =
{"do_remote_prefill": true, "transfer_id": T, "remote_host", "remote_port", "first_token_id"}`. The first
token is appended (and reported) at once; the request waits in the queue (WAITING_FOR_REMOTE_KV) for the
policy to admit it, gets blocks for its prompt (local prefix hits first) and is `recving` while the connector
pulls the rest into them (`kv_transfer.recv`). When the connector reports the pull (`kv_recved`): done, the
prompt counts as computed; failed or late, only the local hits do and the prompt is recomputed. Either way it
is `ready` and runs next as a new request. A request aborted while its pull runs keeps its blocks until the
connector has let go of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from tokenmill.errors import InvalidRequestError
from tokenmill.request import Request, RequestStatus

PARAM = "kv_transfer_params"


@dataclass
class RemoteDecode:
    """A producer's request: its KV goes to a consumer under `transfer_id`."""

    transfer_id: str


@dataclass
class RemotePrefill:
    """A consumer's request: its prompt's KV is pulled from the producer at host:port."""

    transfer_id: str
    host: str
    port: int
    first_token_id: int


def parse_kv_transfer_params(params: Optional[dict[str, Any]]) -> Union[RemoteDecode, RemotePrefill, None]:
    """The request's role in a disaggregated pair (None: an ordinary request); InvalidRequestError when malformed."""
    if params is None:
        return None

    def bad(msg: str):
        raise InvalidRequestError(f"{PARAM}: {msg}", param=PARAM)

    if not isinstance(params, dict):
        bad("must be an object")
    tid = params.get("transfer_id")
    if not isinstance(tid, str) or not tid or len(tid) > 256:
        bad("transfer_id must be a non-empty string of at most 256 characters")
    decode, prefill = params.get("do_remote_decode") is True, params.get("do_remote_prefill") is True
    if decode == prefill:
        bad("exactly one of do_remote_decode and do_remote_prefill must be true")
    if decode:
        return RemoteDecode(tid)
    host, port, first = params.get("remote_host"), params.get("remote_port"), params.get("first_token_id")
    if not isinstance(host, str) or not host:
        bad("remote_host must be a non-empty string")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        bad("remote_port must be an integer in [1, 65535]")
    if not isinstance(first, int) or isinstance(first, bool) or first < 0:
        bad("first_token_id must be a non-negative integer")
    return RemotePrefill(tid, host, port, first)


@dataclass
class KVSend:
    """Blocks a producer serves: `block_ids[i]` holds tokens [i * block_size, (i + 1) * block_size)."""

    transfer_id: str
    block_ids: list[int]
    token_ids: list[int]  # the prompt whose KV the blocks hold (the consumer checks it)
    first_token_id: int


@dataclass
class KVRecv:
    """A pull: the producer's blocks first_block .. first_block + len(block_ids) - 1 into `block_ids`."""

    transfer_id: str
    host: str
    port: int
    block_ids: list[int]
    first_block: int  # the blocks before it are local prefix-cache hits
    token_ids: list[int]  # the request's prompt (checked against the producer's)


@dataclass
class KVTransferStep:
    """The KV connector's work of one step (SchedulerOutput.kv_transfer)."""

    send: dict[str, KVSend] = field(default_factory=dict)
    recv: dict[str, KVRecv] = field(default_factory=dict)
    cancel: list[str] = field(default_factory=list)  # pulls of aborted requests
    pending: bool = False  # transfers in flight: the runner reports them even on a step that runs nothing


class KVTransferTracker:
    """The scheduler's KV-transfer state; `role` is KVTransferConfig.kv_role (None: off)."""

    def __init__(self, role: Optional[str], block_size: int):
        self.role = role
        self.block_size = block_size
        self.remote: dict[str, Union[RemoteDecode, RemotePrefill]] = {}
        self.sending: dict[str, Request] = {}  # finished producer requests whose blocks are held
        self.recving: dict[str, tuple[Request, int]] = {}  # consumer requests being pulled -> local hit tokens
        self.ready: list[Request] = []  # pulled (or to recompute): run next as new requests
        self.first: list[tuple[Request, int, Optional[RequestStatus], Any]] = []  # first tokens to report
        self._step = KVTransferStep()
        # cumulative statistics
        self.num_sent = 0
        self.num_recv_ok = 0
        self.num_recv_failed = 0

    # ---- requests ------------------------------------------------------------------------------
    def check(self, req: Request) -> Union[RemoteDecode, RemotePrefill, None]:
        """Parse the request's kv_transfer_params against this instance's role (InvalidRequestError)."""
        remote = parse_kv_transfer_params(req.sampling_params.kv_transfer_params)
        if remote is None:
            return None
        sp = req.sampling_params
        for name, value in (("logprobs", sp.logprobs), ("prompt_logprobs", sp.prompt_logprobs),
                            ("structured_outputs", sp.structured_outputs)):
            if value is not None:  # the decode side neither sees the prompt's logits nor the first token's
                raise InvalidRequestError(f"{name} is not supported with disaggregated prefill / decode "
                                          f"({PARAM}) yet", param=name)
        if isinstance(remote, RemoteDecode):
            if self.role not in ("producer", "both"):
                raise InvalidRequestError(f"{PARAM}: do_remote_decode needs a server started with --kv-role "
                                          f"producer or both (this one: {self.role})", param=PARAM)
            if req.max_tokens != 1:
                raise InvalidRequestError("a do_remote_decode request (the prefill side) must have max_tokens 1",
                                          param="max_tokens")
        elif self.role not in ("consumer", "both"):
            raise InvalidRequestError(f"{PARAM}: do_remote_prefill needs a server started with --kv-role "
                                      f"consumer or both (this one: {self.role})", param=PARAM)
        return remote

    def is_remote_prefill(self, req_id: str) -> bool:
        return isinstance(self.remote.get(req_id), RemotePrefill)

    # ---- producer ------------------------------------------------------------------------------
    def hold_for_send(self, req: Request, block_ids: list[int]) -> bool:
        """A finished request: True if its blocks are kept for a consumer (the runner serves them)."""
        remote = self.remote.pop(req.request_id, None)
        if not isinstance(remote, RemoteDecode) or req.status not in (RequestStatus.FINISHED_STOPPED,
                                                                      RequestStatus.FINISHED_LENGTH):
            return False
        n = -(-req.num_prompt_tokens // self.block_size)
        if len(block_ids) < n or not req.output_token_ids:
            return False
        self.sending[req.request_id] = req
        self._step.send[req.request_id] = KVSend(remote.transfer_id, block_ids[:n], list(req.prompt_token_ids),
                                                 req.output_token_ids[0])
        return True

    # ---- consumer ------------------------------------------------------------------------------
    def start_recv(self, req: Request, num_hit: int, block_ids: list[int]) -> None:
        """Blocks for the whole prompt are allocated (the first num_hit tokens' are local hits): pull the rest.
        An empty pull (num_hit = the prompt) only lets the producer free its blocks: an aborted request's."""
        remote = self.remote[req.request_id]
        assert isinstance(remote, RemotePrefill)
        first = num_hit // self.block_size
        n = -(-req.num_prompt_tokens // self.block_size)
        self.recving[req.request_id] = (req, num_hit)
        self._step.recv[req.request_id] = KVRecv(remote.transfer_id, remote.host, remote.port, block_ids[first:n],
                                                 first, list(req.prompt_token_ids))

    def abort_recv(self, req: Request) -> None:
        """The request ended while its pull runs: the connector stops; its blocks are freed when it reports."""
        self._step.recv.pop(req.request_id, None)
        self._step.cancel.append(req.request_id)

    def finish_recv(self, req_id: str, ok: bool) -> Optional[tuple[Request, int]]:
        """The connector is done with the request's blocks; (request, local hit tokens) or None if unknown."""
        entry = self.recving.pop(req_id, None)
        if entry is not None:
            self.remote.pop(req_id, None)
            if entry[0].is_finished:  # aborted: not a transfer to count
                pass
            elif ok:
                self.num_recv_ok += 1
            else:
                self.num_recv_failed += 1
        return entry

    def finish_send(self, req_id: str) -> Optional[Request]:
        req = self.sending.pop(req_id, None)
        if req is not None:
            self.num_sent += 1
        return req

    # ---- steps ---------------------------------------------------------------------------------
    @property
    def num_seated(self) -> int:
        """Consumer requests that hold blocks and a seat without running yet."""
        return len(self.recving) + len(self.ready)

    @property
    def busy(self) -> bool:
        """Work the engine must step for even with nothing to run."""
        return bool(self.sending or self.recving or self.ready or self.first or self._step.cancel)

    def take_step(self) -> Optional[KVTransferStep]:
        step = self._step
        step.pending = bool(self.sending or self.recving)
        if not (step.send or step.recv or step.cancel or step.pending):
            return None
        self._step = KVTransferStep()
        return step

    def take_first(self) -> list[tuple[Request, int, Optional[RequestStatus], Any]]:
        first, self.first = self.first, []
        return first
