"""MultiprocExecutor: one worker process per tensor-parallel rank on this machine (no Ray needed).

Each worker (tokenmill.executor.worker.Worker in a spawned process) talks to the executor over its own
pipe: the pickled SchedulerOutput goes to every rank, every rank answers (rank 0 with the
ModelRunnerOutput). A worker that dies is seen at once (its process sentinel) and raises ExecutorDeadError;
a worker exits when the executor's end of its pipe closes.
"""
from __future__ import annotations

import logging
import multiprocessing
import pickle
import socket
from multiprocessing.connection import wait
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.core.outputs import ModelRunnerOutput, SchedulerOutput
from tokenmill.errors import TokenmillError
from tokenmill.executor.base import Executor, ExecutorDeadError, ModelInfo

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _worker_main(config: EngineConfig, rank: int, world_size: int, init_method: str, conn: Any) -> None:
    import os
    import signal

    from tokenmill.ops.cpu.host import tune_openmp_wait

    tune_openmp_wait(os.environ)  # before torch and the kernels load libgomp
    from tokenmill.engine.core_proc import encode_error
    from tokenmill.executor.worker import Worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine stops its workers
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = Worker(config, rank, world_size, init_method)
    try:
        info = worker.load()
    except BaseException as exc:  # noqa: BLE001 - raised by the executor
        if not isinstance(exc, TokenmillError):  # a user error is one line, raised by the executor
            logger.exception("rank %d failed to load", rank)
        conn.send(("error", encode_error(exc)))
        return
    conn.send(("ok", info))
    try:
        while True:
            try:
                msg = pickle.loads(conn.recv_bytes())
            except EOFError:  # the executor is gone
                break
            if msg[0] == "shutdown":
                break
            try:
                reply = ("ok", worker.execute_model(msg[1]))
            except Exception as exc:  # noqa: BLE001 - the step fails, the executor raises it
                logger.exception("rank %d: step failed", rank)
                reply = ("error", f"{type(exc).__name__}: {exc}")
            conn.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        worker.shutdown()


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.world_size = config.parallel.tensor_parallel_size
        self._procs: list[Any] = []
        self._conns: list[Any] = []

    def load(self) -> ModelInfo:
        mp = multiprocessing.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        for rank in range(self.world_size):
            parent, child = mp.Pipe()
            proc = mp.Process(target=_worker_main, name=f"tokenmill-rank{rank}", daemon=True,
                              args=(self.config, rank, self.world_size, init_method, child))
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        try:
            return self._handshakes()
        except BaseException:
            self.shutdown(kill=True)  # the other ranks may wait for the failed one in a collective
            raise

    def _handshakes(self) -> ModelInfo:
        """Every rank's load answer; the first error (or death) is raised at once."""
        from tokenmill.engine.core_proc import decode_error

        infos: dict[int, ModelInfo] = {}
        while len(infos) < self.world_size:
            waiting = [r for r in range(self.world_size) if r not in infos]
            ready = wait([self._conns[r] for r in waiting] + [self._procs[r].sentinel for r in waiting])
            for r in waiting:
                if self._conns[r] in ready:
                    try:
                        kind, payload = self._conns[r].recv()
                    except EOFError:
                        kind, payload = "dead", None
                    if kind == "error":
                        raise decode_error(payload)
                    if kind == "ok":
                        infos[r] = payload
                        continue
                if self._procs[r].sentinel in ready or not self._procs[r].is_alive():
                    self._procs[r].join(1.0)
                    raise ExecutorDeadError(f"tensor-parallel rank {r} exited while loading "
                                            f"(code {self._procs[r].exitcode})")
        return infos[0]

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        data = pickle.dumps(("step", sched), protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self._conns):
            try:
                conn.send_bytes(data)
            except (BrokenPipeError, OSError):
                raise ExecutorDeadError(f"tensor-parallel rank {rank} is gone") from None
        replies = self._replies()
        for kind, payload in replies:
            if kind == "error":
                raise RuntimeError(payload)
        return replies[0][1]

    def _replies(self) -> list:
        """Every rank's answer to a step, in rank order. Waits on all ranks at once: a rank that dies while the
        others block in a collective raises ExecutorDeadError at once instead of hanging on them."""
        replies: dict[int, Any] = {}
        while len(replies) < self.world_size:
            waiting = [r for r in range(self.world_size) if r not in replies]
            ready = wait([self._conns[r] for r in waiting] + [p.sentinel for p in self._procs])
            for r in waiting:
                if self._conns[r] in ready:
                    try:
                        replies[r] = pickle.loads(self._conns[r].recv_bytes())
                        continue
                    except EOFError:
                        pass
            for r, proc in enumerate(self._procs):
                if proc.sentinel in ready or not proc.is_alive():
                    proc.join(1.0)
                    raise ExecutorDeadError(f"tensor-parallel rank {r} exited (code {proc.exitcode})")
        return [replies[r] for r in range(self.world_size)]

    def shutdown(self, kill: bool = False) -> None:
        for conn in self._conns:
            try:
                conn.send_bytes(pickle.dumps(("shutdown",)))
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(0.0 if kill else 10.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
