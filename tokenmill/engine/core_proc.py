"""The engine core in its own process: scheduler + executor, stepped in a loop, spoken to over ZeroMQ.

The API process (engine/core_client.py) tokenizes, detokenizes and serves HTTP; this process only
schedules and runs the model, so Python work on the HTTP side never delays a step. Two ZeroMQ PUSH/PULL
pipes carry pickled tuples of the existing dataclasses:

    in  (API -> engine):  ("add", request_id, [Request, ...])   ("abort", [engine request ids], RequestStatus)
                          ("shutdown",)
                          ("ft", "submit", JobSpec)  ("ft", "cancel", job id)   (fine-tuning)
    out (engine -> API):  ("added", request_id, error or None)  ("out", [EngineCoreOutput, ...], EngineStats)
                          ("dead", message)  ("ft_updates", [JobUpdate, ...])

The load handshake (ModelInfo, the streaming prompt limit, first stats) or the load error travels over the
multiprocessing pipe the process was started with; that pipe's end-of-file also tells this process that
the API process is gone, and it then exits.
"""
from __future__ import annotations

import logging
import pickle
import traceback
from typing import Any, Optional

from tokenmill.config import EngineConfig
from tokenmill.errors import TokenmillError
from tokenmill.request import RequestStatus

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 1000  # idle: block on the input this long, then look at the parent pipe again
PARENT_GONE = "parent-gone"  # what _EngineLoop.run returns when the API process closed its pipe (or died)


def encode_error(exc: BaseException) -> tuple:
    """An exception as plain data: TokenmillError keeps its class, param and code across processes."""
    if isinstance(exc, TokenmillError):
        return (type(exc), exc.message, exc.param, exc.code)
    return (RuntimeError, f"{type(exc).__name__}: {exc}", None, None)


def decode_error(data: tuple) -> BaseException:
    cls, message, param, code = data
    if issubclass(cls, TokenmillError):
        exc = cls.__new__(cls)
        ValueError.__init__(exc, message)
        exc.message, exc.param, exc.code = message, param, code
        return exc
    return cls(message)


def run_engine_core(config: EngineConfig, in_addr: str, out_addr: str, conn: Any) -> None:
    """Entry point of the engine process (multiprocessing spawn target)."""
    import os
    import signal
    import sys

    from tokenmill.ops.cpu.host import tune_openmp_wait

    tune_openmp_wait(os.environ)  # before torch and the kernels load libgomp

    # Ctrl-C and SIGTERM are for the server, which drains and then stops this process (a terminal or a
    # supervisor signals the whole process group); it also exits when the server's end of `conn` closes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine-core: %(message)s")
    from tokenmill.engine.engine_core import EngineCore

    try:
        core = EngineCore(config)
        core.load()
    except BaseException as exc:  # noqa: BLE001 - the API process raises it
        if not isinstance(exc, TokenmillError):  # a user error is one line, raised by the API process
            logger.error("engine load failed: %s\n%s", exc, traceback.format_exc())
        conn.send(("error", encode_error(exc)))
        return
    _init_structured_outputs(core, config)
    conn.send(("ok", core.info, core.streaming_max_prompt_tokens(), core.stats()))
    code = 0
    try:
        if _EngineLoop(core, in_addr, out_addr, conn).run() == PARENT_GONE:
            _remove_socket_dir(in_addr)
    except BaseException:  # noqa: BLE001 - reported to the API process as "dead"
        code = 1
    finally:
        try:
            core.shutdown()
        except Exception:  # noqa: BLE001
            logger.exception("executor shutdown failed")
    sys.exit(code)


def _remove_socket_dir(addr: str) -> None:
    """The API process makes the directory of the ipc:// sockets and removes it when it stops; if it died
    (killed), nobody else will, so this process does."""
    import os
    import shutil

    if addr.startswith("ipc://"):
        shutil.rmtree(os.path.dirname(addr[len("ipc://"):]), ignore_errors=True)


def _init_structured_outputs(core: Any, config: EngineConfig) -> None:
    """Constrained decoding runs beside the scheduler, so this process loads the tokenizer too (for the
    vocabulary's strings; the API process keeps tokenizing and detokenizing)."""
    if config.model.skip_tokenizer_init:
        return
    from tokenmill.engine.tokenizer import eos_token_ids, load_tokenizer

    info = core.info
    try:
        tok = load_tokenizer(config.model.tokenizer) if config.model.tokenizer else \
            load_tokenizer(info.model_path, info.gguf_file)
    except Exception as exc:  # noqa: BLE001 - the API process reports tokenizer errors itself
        logger.warning("no tokenizer in the engine process, structured outputs disabled: %s", exc)
        return
    core.init_structured_outputs(tok, info.vocab_size, eos_token_ids(tok, {"eos_token_id": list(info.eos_token_ids)}))


class _EngineLoop:
    def __init__(self, core: Any, in_addr: str, out_addr: str, conn: Any):
        import zmq

        self.zmq = zmq
        self.core, self.conn = core, conn
        self.ctx = zmq.Context()
        self.inp = self.ctx.socket(zmq.PULL)
        self.inp.connect(in_addr)
        self.out = self.ctx.socket(zmq.PUSH)
        self.out.setsockopt(zmq.SNDHWM, 0)  # never drop or block on outputs
        self.out.setsockopt(zmq.LINGER, 2000)
        self.out.connect(out_addr)
        self.poller = zmq.Poller()
        self.poller.register(self.inp, zmq.POLLIN)
        self.poller.register(conn.fileno(), zmq.POLLIN)
        self.stopping = False

    def send(self, msg: tuple) -> None:
        self.out.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL), copy=False)

    def run(self) -> Optional[str]:
        """Step until told to shut down (returns None) or the API process is gone (returns PARENT_GONE)."""
        core = self.core
        try:
            while not self.stopping:
                busy = core.has_work() or core.has_training()
                events = dict(self.poller.poll(0 if busy else IDLE_POLL_MS))
                if self.conn.fileno() in events:  # the API process closed its end (or died)
                    return PARENT_GONE
                if self.inp in events:
                    self._drain()
                if core.has_work() or core.has_training():
                    self.send(("out", core.step(), core.stats()))
                self._send_finetune_updates()
        except BaseException as exc:
            msg = f"{type(exc).__name__}: {exc}"
            logger.error("engine loop died: %s\n%s", exc, traceback.format_exc())
            self.send(("dead", msg))
            raise
        finally:
            self.ctx.destroy(linger=2000)

    def _drain(self) -> None:
        """All queued commands, then one "out" with the stats they changed and the outputs known without a step."""
        zmq, core = self.zmq, self.core
        changed = False
        while True:
            try:
                msg = pickle.loads(self.inp.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            kind = msg[0]
            if kind == "add":
                _, rid, reqs = msg
                self.send(("added", rid, self._add(reqs)))
            elif kind == "abort":
                _, ids, status = msg
                core.abort_requests(ids, RequestStatus(status))
            elif kind == "ft":
                _, op, arg = msg
                core.finetune.submit(arg) if op == "submit" else core.finetune.cancel(arg)
            elif kind in ("lora_add", "lora_remove"):  # (kind, call id, args...): answered with "called"
                self.send(("called", msg[1], *self._lora(kind, msg[2:])))
            elif kind == "shutdown":
                self.stopping = True
            changed = True
        if changed:  # with the first tokens of transferred requests (disaggregated decode): now, not after a step
            self.send(("out", core.take_ready_outputs(), core.stats()))

    def _send_finetune_updates(self) -> None:
        ft = self.core.finetune
        updates = ft.take_updates() if ft is not None else []
        if updates:
            self.send(("ft_updates", updates))
    def _lora(self, kind: str, args: tuple) -> tuple:
        try:
            fn = self.core.add_lora if kind == "lora_add" else self.core.remove_lora
            return fn(*args), None
        except Exception as exc:  # noqa: BLE001 - refused (in use, no free slot): the caller gets the error
            return None, encode_error(exc)

    def _add(self, reqs: list) -> Optional[tuple]:
        added = []
        try:
            for req in reqs:
                self.core.add_request(req)
                added.append(req.request_id)
        except Exception as exc:  # noqa: BLE001 - refused (queue full, too long): the caller gets the error
            self.core.abort_requests(added)
            return encode_error(exc)
        return None
