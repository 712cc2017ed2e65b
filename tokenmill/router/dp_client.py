"""DataParallelClient: `tokenmill serve --data-parallel-size N`, N engine-core processes behind one API server.

Each replica is an EngineProcClient (engine/core_client.py) with the whole model. On a CUDA device
replica i runs on cuda:i; on the CPU the cores this process may use are split into N contiguous groups and
replica i's process is started from a thread pinned to group i (os.sched_setaffinity on the calling thread;
a spawned process inherits it), so each engine's OpenMP pool sizes itself to its own cores. The routing
policy (tokenmill/router/policy.py) picks the replica of each request from the replicas' running / waiting
/ KV figures (sent with every step) and, for `prefix`, the prompt's chained block hashes.

Implements EngineClient. If any replica's process dies, is_alive turns False: /health fails and the server
exits 1, as with one engine (a supervisor restarts the whole server).
"""
from __future__ import annotations

import asyncio
import copy
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Optional

from tokenmill.config import EngineConfig
from tokenmill.engine.protocol import EngineStats, merge_stats
from tokenmill.errors import ConfigError
from tokenmill.outputs import RequestOutput
from tokenmill.router.policy import BackendLoad, make_policy, prompt_block_hashes
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MAX_PREFIX_BLOCKS = 256


def split_cores(cores: list[int], n: int) -> list[Optional[list[int]]]:
    """N contiguous groups of the cores (sizes differ by at most one); None each when there are fewer cores
    than replicas (no pinning then)."""
    cores = sorted(cores)
    if len(cores) < n:
        return [None] * n
    base, extra = divmod(len(cores), n)
    out, start = [], 0
    for i in range(n):
        k = base + (1 if i < extra else 0)
        out.append(cores[start:start + k])
        start += k
    return out


def replica_configs(config: EngineConfig, n: int, cuda_count: int) -> list[EngineConfig]:
    """One config per replica: on CUDA, replica i gets cuda:i (ConfigError when there are too few devices)."""
    dev = config.model.device
    on_cuda = dev.startswith("cuda") or (dev == "auto" and cuda_count > 0)
    if on_cuda and dev not in ("auto", "cuda"):
        raise ConfigError(f"with --data-parallel-size, give --device cuda (or auto), not {dev}: replica i runs on "
                          "cuda:i")
    if on_cuda and cuda_count < n:
        raise ConfigError(f"--data-parallel-size {n} needs {n} CUDA devices, this machine has {cuda_count}")
    out = []
    for i in range(n):
        c = copy.deepcopy(config)
        if on_cuda:
            c.model.device = f"cuda:{i}"
        out.append(c)
    return out


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


class DataParallelClient:
    def __init__(self, clients: list[Any], policy: str, block_size: int):
        self.clients = clients
        first = clients[0]
        self.config = first.config
        self.model_name, self.max_model_len = first.model_name, first.max_model_len
        self.tokenizer, self.processor = first.tokenizer, first.processor
        self.policy = make_policy(policy)
        self.block_size = block_size
        self._owner: dict[str, int] = {}
        self._in_flight = [0] * len(clients)
        self.routed = [0] * len(clients)

    @classmethod
    def from_config(cls, config: EngineConfig, size: int, policy: str = "prefix") -> "DataParallelClient":
        from tokenmill.engine.core_client import EngineProcClient

        make_policy(policy)  # a bad name fails before anything loads
        if size < 2:
            raise ConfigError(f"data_parallel_size must be at least 2 here, got {size}")
        if config.lora.enable_lora:
            raise ConfigError("enable_lora with data_parallel_size > 1 is not supported yet (adapters are loaded "
                              "into one engine); run one server per replica behind `tokenmill router`",
                              param="enable_lora")
        if config.kv_transfer.kv_role is not None:
            raise ConfigError("kv_role with data_parallel_size > 1 is not supported (one KV server per instance); "
                              "run one server per instance", param="kv_role")
        configs = replica_configs(config, size, _cuda_count())
        on_cuda = configs[0].model.device.startswith("cuda")
        groups = [None] * size if on_cuda else split_cores(list(os.sched_getaffinity(0)), size)
        if not on_cuda and groups[0] is None:
            logger.warning("%d replicas on %d cores: the engine processes are not pinned", size,
                           len(os.sched_getaffinity(0)))

        def start(i: int):
            if groups[i] is not None:
                os.sched_setaffinity(0, groups[i])  # this worker thread only; the spawned process inherits it
            return EngineProcClient.from_config(configs[i])

        with ThreadPoolExecutor(size, thread_name_prefix="tokenmill-dp-start") as pool:
            futs = [pool.submit(start, i) for i in range(size)]
            clients, error = [], None
            for f in futs:
                try:
                    clients.append(f.result())
                except BaseException as exc:  # noqa: BLE001 - stop the ones that loaded, raise the first error
                    error = error or exc
        if error is not None:
            for c in clients:
                c._proc.kill()
                c._close()
            raise error
        for i, g in enumerate(groups):
            logger.info("data-parallel replica %d: %s", i, configs[i].model.device if on_cuda else f"cores {g}")
        return cls(clients, policy, config.cache.block_size)

    def start(self) -> "DataParallelClient":
        for c in self.clients:
            c.start()
        return self

    @property
    def is_alive(self) -> bool:
        return all(c.is_alive for c in self.clients)

    def loads(self) -> list[BackendLoad]:
        out = []
        for c, n in zip(self.clients, self._in_flight):
            s = c.get_stats()
            usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
            out.append(BackendLoad(s.num_running, s.num_waiting, usage, n))
        return out

    def get_stats(self) -> EngineStats:
        return merge_stats([c.get_stats() for c in self.clients])

    async def generate(self, prompt: Optional[str], params: SamplingParams, request_id: str,
                       prompt_token_ids: Optional[list[int]] = None,
                       arrival_time: Optional[float] = None) -> AsyncIterator[RequestOutput]:
        if prompt_token_ids is None and isinstance(prompt, str):
            prompt_token_ids = await asyncio.to_thread(self.processor.tokenize, prompt)
        hashes: list[int] = []
        if self.policy.needs_hashes and prompt_token_ids:
            hashes = prompt_block_hashes(prompt_token_ids[:-1], self.block_size, params.cache_salt, MAX_PREFIX_BLOCKS)
        live = [i for i, c in enumerate(self.clients) if c.is_alive] or list(range(len(self.clients)))
        i = self.policy.choose(live, self.loads(), hashes).backend
        self.policy.routed(i, hashes)
        self.routed[i] += 1
        self._owner[request_id] = i
        self._in_flight[i] += 1
        try:
            async for out in self.clients[i].generate(prompt, params, request_id, prompt_token_ids, arrival_time):
                yield out
        finally:
            self._in_flight[i] -= 1
            self._owner.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        i = self._owner.get(request_id)
        if i is not None:
            await self.clients[i].abort(request_id)

    async def shutdown(self, grace_s: float = 5.0) -> None:
        await asyncio.gather(*(c.shutdown(grace_s) for c in self.clients))
