"""AsyncEngine: the LLMEngine stepped on a background thread, with one asyncio stream per request.

The event loop never runs model code: tokenization runs in a worker thread, steps and detokenization
on the engine thread; outputs cross back with call_soon_threadsafe. Implements EngineClient.

`from_config` loads the model on the engine thread itself, so one thread runs every torch / OpenMP
parallel region of the process. libgomp keeps a worker pool per thread that starts parallel regions;
once two pools exist it counts more busy threads than cores and stops spinning between regions, and
every region then waits on a futex wake-up: loading on the main thread and stepping on another made
each decode step 1.7-2x slower on a 2-core CPU (bench/http_overhead.py, tests/engine/test_async_engine.py).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.protocol import EngineStats
from tokenmill.errors import EngineDeadError, EngineOverloadedError
from tokenmill.engine.output_box import OutputBox, aborted_output
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    box: OutputBox
    added: asyncio.Future


class AsyncEngine:
    def __init__(self, engine: LLMEngine, thread: Optional[threading.Thread] = None):
        self.engine = engine
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.tokenizer = engine.tokenizer
        self.processor = engine.processor
        self.config = engine.config
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._thread: Optional[threading.Thread] = thread
        self._go = threading.Event()  # start() releases a thread that loaded the engine into the loop
        self._stopping = False
        self._accepting = True
        self._dead: Optional[str] = None
        self._stats = engine.stats()
        self._ft_listener = None  # (event loop, callback) for fine-tuning job updates

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncEngine":
        """Load the engine on a new engine thread (blocks until loaded; load errors are raised here)."""
        ready: concurrent.futures.Future = concurrent.futures.Future()
        threading.Thread(target=cls._load_and_run, args=(config, ready), name="tokenmill-engine",
                         daemon=True).start()
        return ready.result()

    @classmethod
    def _load_and_run(cls, config: EngineConfig, ready: concurrent.futures.Future) -> None:
        try:
            self = cls(LLMEngine.from_config(config), thread=threading.current_thread())
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(self)
        self._go.wait()
        if not self._stopping:
            self._run()

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "AsyncEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
            self._thread.start()
        self._go.set()
        return self

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop accepting; let in-flight requests finish for up to grace_s, then abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self._streams):
            self._commands.put(("abort", rid, None))
        self._stopping = True
        self._wake.set()
        self._go.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)

    def get_stats(self) -> EngineStats:
        s = self._stats
        s.loop_alive = self.is_alive
        return s

    # ---- requests ------------------------------------------------------------------------------
    async def generate(self, prompt: Optional[str], params: SamplingParams, request_id: str,
                       prompt_token_ids: Optional[list[int]] = None,
                       arrival_time: Optional[float] = None, lora_request=None) -> AsyncIterator[RequestOutput]:
        """Outputs as params.output_kind says; arrival_time (time.monotonic()) defaults to now."""
        arrival = time.monotonic() if arrival_time is None else arrival_time
        if self._dead is not None:
            raise EngineDeadError(f"the engine has stopped: {self._dead}")
        if not self._accepting:
            raise EngineOverloadedError("the server is shutting down")
        if not self._go.is_set():
            self.start()
        prepared = await asyncio.to_thread(self.engine.prepare, prompt, params, prompt_token_ids)
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, OutputBox(params.output_kind), loop.create_future())
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, (prompt, params, prepared, arrival, lora_request)))
        self._wake.set()
        finished = False
        try:
            await stream.added  # raises EngineOverloadedError etc.
            while True:
                item = await stream.box.get()
                finished = item.finished
                yield item
                if finished:
                    break
        finally:
            if not finished:
                self._commands.put(("abort", request_id, None))
                self._wake.set()
            self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))
        self._wake.set()

    # ---- fine-tuning (tokenmill/finetune: jobs train on the engine thread between steps) ------------------
    def finetune_submit(self, spec) -> None:
        self._commands.put(("ft_submit", None, spec))
        self._wake.set()

    def finetune_cancel(self, job_id: str) -> None:
        self._commands.put(("ft_cancel", job_id, None))
        self._wake.set()

    def finetune_listen(self, callback) -> None:
        """callback(list[JobUpdate]) runs on the calling event loop."""
        self._ft_listener = (asyncio.get_running_loop(), callback)

    def _ft_deliver(self) -> None:
        ft = self.engine.core.finetune
        updates = ft.take_updates() if ft is not None else []
        if updates and self._ft_listener is not None:
            loop, callback = self._ft_listener
            loop.call_soon_threadsafe(callback, updates)
    # ---- LoRA adapters (enable_lora) -------------------------------------------------------------
    async def _on_engine_thread(self, fn):
        if not self._go.is_set():
            self.start()
        fut = asyncio.get_running_loop().create_future()
        self._commands.put(("call", None, (fn, fut)))
        self._wake.set()
        return await fut

    async def add_lora(self, lora_request) -> bool:
        """Read the adapter in a worker thread (off the step loop), then register it on the engine thread."""
        if lora_request.lora_int_id in self.engine.lora_requests:
            return False
        weights = await asyncio.to_thread(self.engine.read_lora, lora_request)
        return await self._on_engine_thread(lambda eng: eng.register_lora(lora_request, weights))

    async def remove_lora(self, lora_int_id: int) -> bool:
        return await self._on_engine_thread(lambda eng: eng.remove_lora(lora_int_id))

    async def list_loras(self) -> set[int]:
        return self.engine.list_loras()

    def lora_requests(self) -> list:
        """The adapters loaded (LoRARequest), for /v1/models and request routing."""
        return list(self.engine.lora_requests.values())

    # ---- engine thread -------------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.box.put, item)

    def _deliver_step(self, outs: list) -> None:
        """A step's outputs, one wake-up of each event loop (not one per request: each wake-up costs the
        engine's OpenMP threads a core for a moment on a small CPU)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.box, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _resolve(self, request_id: str, exc: Optional[BaseException]) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return

        def done(fut=stream.added):
            if not fut.done():
                fut.set_exception(exc) if exc is not None else fut.set_result(None)

        stream.loop.call_soon_threadsafe(done)

    def _drain(self) -> None:
        eng = self.engine
        added = False
        while True:
            try:
                kind, rid, payload = self._commands.get_nowait()
            except queue.Empty:
                if added:  # the first tokens of transferred requests (disaggregated decode): now, not after a step
                    self._deliver_step(eng.ready_outputs())
                return
            if kind == "add":
                added = True
                prompt, params, prepared, arrival, lora = payload
                if rid not in self._streams:
                    continue  # the client left before the request reached the engine
                try:
                    eng.add_request(rid, prompt, params, arrival_time=arrival, prepared=prepared, lora_request=lora)
                    self._resolve(rid, None)
                except Exception as exc:
                    self._resolve(rid, exc)
            elif kind == "call":  # payload: (function of the engine, future): LoRA adapter changes
                fn, fut = payload
                try:
                    res = fn(eng)
                    fut.get_loop().call_soon_threadsafe(_settle, fut, res, None)
                except Exception as exc:  # noqa: BLE001 - the caller gets it
                    fut.get_loop().call_soon_threadsafe(_settle, fut, None, exc)
            elif kind == "abort":
                if eng.output_processor.has(rid):
                    eng.abort_request(rid)
                    self._deliver(rid, aborted_output(rid))
            elif kind == "ft_submit":
                eng.core.finetune.submit(payload)
            elif kind == "ft_cancel":
                eng.core.finetune.cancel(rid)

    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stopping:
                self._drain()
                self._ft_deliver()
                if not eng.has_unfinished_requests() and not eng.core.has_training():
                    self._stats = eng.stats()
                    self._wake.wait(0.25)
                    self._wake.clear()
                    continue
                self._deliver_step(eng.step())
                self._ft_deliver()
                self._stats = eng.stats()
            self._drain()  # aborts queued by shutdown() still reach their streams
            eng.shutdown()
        except BaseException as exc:  # a bug outside a step: the engine cannot go on
            self._dead = f"{type(exc).__name__}: {exc}"
            logger.error("engine loop died: %s\n%s", exc, traceback.format_exc())
            err = EngineDeadError(f"the engine has stopped: {self._dead}")
            for rid in list(self._streams):
                self._resolve(rid, err)
                self._deliver(rid, err)
            try:
                eng.shutdown()
            except Exception:  # noqa: BLE001 - already dead: stopping the ranks is best effort
                logger.exception("executor shutdown failed")


def _settle(fut: asyncio.Future, result, exc) -> None:
    if not fut.done():
        fut.set_exception(exc) if exc is not None else fut.set_result(result)


def _put_all(items: list) -> None:
    for box, item in items:
        box.put(item)
