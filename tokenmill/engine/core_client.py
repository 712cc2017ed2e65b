"""EngineProcClient: the API-process side of an engine core running in its own process (engine/core_proc.py).

Implements EngineClient like AsyncEngine does, so the server cannot tell them apart: tokenization and
validation (Processor), detokenization and stop strings (OutputProcessor) and the per-stream output boxes
(output_kind, merged pending deltas) run here, on the event loop; the engine process receives whole
`Request`s and sends back per-step `EngineCoreOutput`s.

A dead engine process is seen at once (the event loop watches the process sentinel): every pending and
future request fails with EngineDeadError, `is_alive` turns False and /health fails. Nothing waits on
the engine without also watching for its death.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import pickle
import shutil
import tempfile
import time
from typing import Any, AsyncIterator, Optional

from tokenmill.config import EngineConfig
from tokenmill.core.outputs import EngineCoreOutput
from tokenmill.engine.core_proc import decode_error, run_engine_core
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.output_box import OutputBox, aborted_output
from tokenmill.engine.protocol import EngineStats
from tokenmill.errors import EngineDeadError, EngineOverloadedError
from tokenmill.outputs import RequestOutput
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

LOAD_POLL_S = 0.2


class _ParseOnlyStructured:
    """`manager.validate(so)` parses a constraint without compiling it."""

    @property
    def manager(self) -> "_ParseOnlyStructured":
        return self

    def validate(self, so: Any) -> None:
        from tokenmill.structured.grammar import build_grammar

        build_grammar(so)


class _RemoteCore:
    """What LLMEngine sees as its `core` in the API process: requests are collected for one "add" message,
    aborts are sent at once."""

    def __init__(self, info: Any, streaming_max_prompt: Optional[int], send):
        self.info = info
        self._streaming_max_prompt = streaming_max_prompt
        self._send = send
        self.pending: list[Request] = []
        self.structured: Any = None

    def streaming_max_prompt_tokens(self) -> Optional[int]:
        return self._streaming_max_prompt

    def init_structured_outputs(self, tokenizer: Any, vocab_size: int, stop_token_ids: Any) -> None:
        """The API process only parses constraints (a bad one is a 400 here); the engine process compiles them."""
        self.structured = _ParseOnlyStructured()

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    def add_request(self, req: Request) -> None:
        self.pending.append(req)

    def take_pending(self) -> list[Request]:
        reqs, self.pending = self.pending, []
        return reqs

    def abort_requests(self, request_ids, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        ids = list(request_ids)
        if ids:
            self._send(("abort", ids, int(status)))

    def shutdown(self) -> None:
        pass


class EngineProcClient:
    def __init__(self, config: EngineConfig, proc: Any, conn: Any, sock_dir: str, handshake: tuple,
                 sockets: tuple):
        self.config = config
        self._proc, self._conn, self._sock_dir = proc, conn, sock_dir
        self._ctx, self._in, self._actx, self._out = sockets  # PUSH (requests in), asyncio PULL (outputs)
        _, info, streaming_max_prompt, stats = handshake
        self.engine = LLMEngine(config, core=_RemoteCore(info, streaming_max_prompt, self._send))
        self.engine._init_frontend(info)
        self.model_name = self.engine.model_name
        self.max_model_len = info.max_model_len
        self.tokenizer = self.engine.tokenizer
        self.processor = self.engine.processor
        self._stats: EngineStats = stats
        self._streams: dict[str, OutputBox] = {}
        self._adds: dict[str, asyncio.Future] = {}
        self._reader: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._accepting = True
        self._dead: Optional[str] = None
        self._ft_listener = None  # fine-tuning job updates -> callback(list[JobUpdate]) on the event loop
        self._calls: dict[int, asyncio.Future] = {}  # LoRA adapter changes awaiting the engine process's reply
        self._call_ids = itertools.count(1)

    def _addr(self, name: str) -> str:
        return f"ipc://{os.path.join(self._sock_dir, name)}"

    # ---- start-up ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: EngineConfig) -> "EngineProcClient":
        """Start the engine process and wait for its load handshake (load errors are raised here)."""
        import zmq
        import zmq.asyncio

        config.validate()
        sock_dir = tempfile.mkdtemp(prefix="tokenmill-")
        in_addr, out_addr = (f"ipc://{os.path.join(sock_dir, n)}" for n in ("in", "out"))
        ctx, actx = zmq.Context(), zmq.asyncio.Context()
        inp = ctx.socket(zmq.PUSH)
        inp.setsockopt(zmq.SNDHWM, 0)
        inp.setsockopt(zmq.LINGER, 0)
        inp.bind(in_addr)
        out = actx.socket(zmq.PULL)
        out.bind(out_addr)
        mp = multiprocessing.get_context("spawn")
        parent, child = mp.Pipe()
        proc = mp.Process(target=run_engine_core, name="tokenmill-engine-core",
                          args=(config, in_addr, out_addr, child))
        proc.start()
        child.close()
        try:
            while not parent.poll(LOAD_POLL_S):
                if not proc.is_alive():
                    raise EngineDeadError(f"the engine process exited with code {proc.exitcode} while loading")
            try:
                handshake = parent.recv()
            except EOFError:
                proc.join(5)
                raise EngineDeadError(f"the engine process exited with code {proc.exitcode} while loading") from None
            if handshake[0] == "error":
                proc.join(10)
                raise decode_error(handshake[1])
            return cls(config, proc, parent, sock_dir, handshake, (ctx, inp, actx, out))
        except BaseException:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            inp.close(0)
            out.close(0)
            parent.close()
            shutil.rmtree(sock_dir, ignore_errors=True)
            raise

    def start(self) -> "EngineProcClient":
        """Watch the engine on the running event loop (called by the server; generate() calls it too)."""
        if self._reader is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return self  # not in a loop yet: the first generate() starts the reader
            self._loop = loop
            self._reader = loop.create_task(self._read_loop())
            loop.add_reader(self._proc.sentinel, self._on_exit)
        return self

    # ---- EngineClient --------------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._proc.is_alive()

    def get_stats(self) -> EngineStats:
        s = self._stats
        s.loop_alive = self.is_alive
        return s

    async def generate(self, prompt: Optional[str], params: SamplingParams, request_id: str,
                       prompt_token_ids: Optional[list[int]] = None,
                       arrival_time: Optional[float] = None, lora_request=None) -> AsyncIterator[RequestOutput]:
        """Outputs as params.output_kind says; arrival_time (time.monotonic()) defaults to now."""
        arrival = time.monotonic() if arrival_time is None else arrival_time
        if not self.is_alive:
            raise EngineDeadError(f"the engine has stopped: {self._dead or 'the engine process is gone'}")
        if not self._accepting:
            raise EngineOverloadedError("the server is shutting down")
        self.start()
        prepared = await asyncio.to_thread(self.engine.prepare, prompt, params, prompt_token_ids)
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        if self._dead is not None:
            raise EngineDeadError(f"the engine has stopped: {self._dead}")
        box = OutputBox(params.output_kind)
        added = asyncio.get_running_loop().create_future()
        self._streams[request_id] = box
        self._adds[request_id] = added
        finished = False
        try:
            self.engine.add_request(request_id, prompt, params, arrival_time=arrival, prepared=prepared,
                                    lora_request=lora_request)
            self._send(("add", request_id, self.engine.core.take_pending()))
            await added  # raises EngineOverloadedError etc. (the engine has dropped the request then)
            while True:
                item = await box.get()
                finished = item.finished
                yield item
                if finished:
                    break
        finally:
            self._streams.pop(request_id, None)
            self._adds.pop(request_id, None)
            if not finished and self.engine.output_processor.has(request_id):
                self._abort_quietly(request_id)

    async def abort(self, request_id: str) -> None:
        if self.engine.output_processor.has(request_id):
            self._abort_quietly(request_id)
            box = self._streams.get(request_id)
            if box is not None:
                box.put(aborted_output(request_id))

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop accepting; let in-flight requests finish for up to grace_s, abort the rest, stop the process."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self._streams and time.monotonic() < deadline and self.is_alive:
            await asyncio.sleep(0.05)
        for rid in list(self._streams):
            await self.abort(rid)
        if self._proc.is_alive():
            self._send(("shutdown",))
            await asyncio.to_thread(self._proc.join, 10.0)
            if self._proc.is_alive():
                logger.warning("the engine process did not stop in 10 s: killing it")
                self._proc.kill()
                await asyncio.to_thread(self._proc.join, 5.0)
        self._close()

    # ---- fine-tuning (tokenmill/finetune: jobs train in the engine process between steps) -----------
    def finetune_submit(self, spec) -> None:
        self.start()
        self._send(("ft", "submit", spec))

    def finetune_cancel(self, job_id: str) -> None:
        self._send(("ft", "cancel", job_id))

    def finetune_listen(self, callback) -> None:
        self._ft_listener = callback
    # ---- LoRA adapters (enable_lora) -------------------------------------------------------------
    async def _call(self, msg: tuple):
        """Send a command the engine process answers with ("called", id, result, error); await the result."""
        if not self.is_alive:
            raise EngineDeadError(f"the engine has stopped: {self._dead or 'the engine process is gone'}")
        self.start()
        cid = next(self._call_ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[cid] = fut
        try:
            self._send((msg[0], cid, *msg[1:]))
            return await fut
        finally:
            self._calls.pop(cid, None)

    async def add_lora(self, lora_request) -> bool:
        """Read the adapter here in a worker thread, then register it in the engine process."""
        if lora_request.lora_int_id in self.engine.lora_requests:
            return False
        weights = await asyncio.to_thread(self.engine.read_lora, lora_request)
        r = lora_request
        ok = await self._call(("lora_add", r.lora_int_id, r.lora_name, r.lora_path, weights))
        if ok:
            self.engine.lora_requests[r.lora_int_id] = r
        return ok

    async def remove_lora(self, lora_int_id: int) -> bool:
        if lora_int_id not in self.engine.lora_requests:
            return False
        await self._call(("lora_remove", lora_int_id))
        del self.engine.lora_requests[lora_int_id]
        return True

    async def list_loras(self) -> set[int]:
        return self.engine.list_loras()

    def lora_requests(self) -> list:
        return list(self.engine.lora_requests.values())

    # ---- internals -----------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        if self._dead is None:
            self._in.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL), copy=False)

    def _abort_quietly(self, request_id: str) -> None:
        ids = self.engine.output_processor.abort(request_id)
        self.engine.core.abort_requests(ids)

    async def _read_loop(self) -> None:
        try:
            while True:
                self._handle(pickle.loads(await self._out.recv(copy=False)))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug here would leave every stream waiting: fail them instead
            logger.exception("engine output processing failed")
            self._fail_all(f"output processing failed: {type(exc).__name__}: {exc}")

    def _handle(self, msg: tuple) -> None:
        """One message from the engine process (see core_proc.py)."""
        op = self.engine.output_processor
        kind = msg[0]
        if kind == "out":
            _, outs, stats = msg
            self._stats = stats
            if not outs:
                return
            ros, stopped = op.process(outs)
            if stopped:
                self.engine.core.abort_requests(stopped, RequestStatus.FINISHED_STOPPED)
            for ro in ros:
                box = self._streams.get(ro.request_id)
                if box is not None:
                    box.put(ro)
        elif kind == "added":
            _, rid, err = msg
            fut = self._adds.get(rid)
            if err is not None:
                op.abort(rid)
            if fut is not None and not fut.done():
                fut.set_exception(decode_error(err)) if err is not None else fut.set_result(None)
        elif kind == "ft_updates":
            if self._ft_listener is not None:
                self._ft_listener(msg[1])
        elif kind == "called":
            _, cid, result, err = msg
            fut = self._calls.get(cid)
            if fut is not None and not fut.done():
                fut.set_exception(decode_error(err)) if err is not None else fut.set_result(result)
        elif kind == "dead":
            self._fail_all(msg[1])

    def _on_exit(self) -> None:
        """The engine process has exited (the event loop saw its sentinel)."""
        self._proc.join(1.0)  # the sentinel fires as the process ends; reaping it may lag a moment
        code = self._proc.exitcode
        if self._accepting or self._streams:
            logger.error("the engine process exited with code %s", code)
        self._fail_all(self._dead or f"the engine process exited with code {code}")
        if self._loop is not None:
            self._loop.remove_reader(self._proc.sentinel)

    def _fail_all(self, why: str) -> None:
        """Requests not yet accepted raise EngineDeadError; running ones get a final output with the error
        (what a failed step gives), so a stream that has started ends with an error event."""
        if self._dead is not None and not self._streams:
            return
        self._dead = self._dead or why
        msg = f"the engine has stopped: {self._dead}"
        op = self.engine.output_processor
        failed = []
        for rid in list(self._streams):
            fut = self._adds.get(rid)
            if fut is not None and not fut.done():
                fut.set_exception(EngineDeadError(msg))
                op.abort(rid)
            else:
                failed += [EngineCoreOutput(eid, [], finish_reason="error", error=msg) for eid in op.engine_ids(rid)]
        for ro in op.process(failed)[0]:
            box = self._streams.get(ro.request_id)
            if box is not None:
                box.put(ro)

    def _close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._proc.sentinel)
        if self._reader is not None:
            self._reader.cancel()
        self._in.close(0)
        self._out.close(0)
        self._ctx.term()
        self._actx.term()
        self._conn.close()
        shutil.rmtree(self._sock_dir, ignore_errors=True)
