"""Worker: one tensor-parallel rank (a worker process of MultiprocExecutor or a Ray actor of RayExecutor).

It joins the rank group, loads its slice of the model into a ModelRunner and runs every step; all ranks
run the same SchedulerOutput (each samples from the same all-gathered logits, so their per-request state
stays identical) and rank 0's ModelRunnerOutput is the answer.
"""
from __future__ import annotations

import os
from typing import Optional

from tokenmill.config import EngineConfig
from tokenmill.core.outputs import ModelRunnerOutput, SchedulerOutput
from tokenmill.executor.base import ModelInfo


class Worker:
    def __init__(self, config: EngineConfig, rank: int, world_size: int, init_method: str,
                 local_device: Optional[int] = None):
        """local_device: the CUDA device index this rank uses (default: its rank, as on one machine)."""
        self.config, self.rank, self.world_size, self.init_method = config, rank, world_size, init_method
        self.local_device = rank if local_device is None else local_device
        self.tp = None
        self.runner = None

    def load(self) -> ModelInfo:
        import torch

        from tokenmill.distributed.group import TPGroup
        from tokenmill.worker.model_runner import ModelRunner, resolve_device

        device = resolve_device(self.config.model.device)
        if device.type == "cpu" and not self.config.model.num_threads:  # the ranks share the cores
            torch.set_num_threads(max(1, (len(os.sched_getaffinity(0)) or 1) // self.world_size))
        if device.type == "cuda":
            torch.cuda.set_device(self.local_device)
            device = torch.device("cuda", self.local_device)
        self.tp = TPGroup.init(self.rank, self.world_size, self.init_method, device, local_device=self.local_device)
        self.runner = ModelRunner(self.config, tp=self.tp)
        self.runner.load()
        return self.runner.model_info()

    def execute_model(self, sched: SchedulerOutput) -> Optional[ModelRunnerOutput]:
        out = self.runner.execute_model(sched)
        return out if self.rank == 0 else None

    def shutdown(self) -> None:
        if self.tp is not None:
            self.tp.destroy()
            self.tp = None
