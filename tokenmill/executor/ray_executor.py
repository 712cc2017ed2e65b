"""RayExecutor: one Ray actor per tensor-parallel rank, placed by a placement group on an existing Ray cluster.

Ray does the cluster work (nodes, placement, process lifetimes); tokenmill only asks for `world_size`
bundles of one GPU (or one CPU for a CPU run) and runs a Worker in each actor. Rank 0's node address and a
free port there become the torch.distributed rendezvous. Without `ray_address` and with no Ray running in
this process, `ray.init()` joins the cluster it finds (`ray start --head` on this machine) or starts a local
one. See docs/DISTRIBUTED.md for the two-node recipe.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from tokenmill.config import EngineConfig
from tokenmill.core.outputs import ModelRunnerOutput, SchedulerOutput
from tokenmill.errors import ConfigError
from tokenmill.executor.base import Executor, ExecutorDeadError, ModelInfo

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 120.0


class _RayWorker:
    """The body of a rank's Ray actor (wrapped with ray.remote at load time, so importing this module needs
    no Ray)."""

    def __init__(self, config: EngineConfig, rank: int, world_size: int):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.worker: Any = None

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port on it (rank 0's become the rendezvous)."""
        import ray

        from tokenmill.executor.multiproc import free_port

        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def load(self, init_method: str) -> ModelInfo:
        from tokenmill.executor.worker import Worker

        # Ray shows an actor only its own GPU (CUDA_VISIBLE_DEVICES), as device 0
        self.worker = Worker(self.config, self.rank, self.world_size, init_method, local_device=0)
        return self.worker.load()

    def execute_model(self, sched: SchedulerOutput) -> Optional[ModelRunnerOutput]:
        return self.worker.execute_model(sched)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.world_size = config.parallel.tensor_parallel_size
        self._actors: list[Any] = []
        self._pg: Any = None
        self._ray: Any = None

    def load(self) -> ModelInfo:
        try:
            import ray
        except ImportError:
            raise ConfigError("distributed_executor_backend ray needs Ray: pip install 'tokenmill[ray]'") from None
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from tokenmill.worker.model_runner import resolve_device

        self._ray = ray
        if not ray.is_initialized():
            ray.init(address=self.config.parallel.ray_address, log_to_driver=False)
        gpu = resolve_device(self.config.model.device).type == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self._pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
        ready, _ = ray.wait([self._pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            self.shutdown()
            raise ConfigError(f"the Ray cluster cannot place {self.world_size} ranks of {bundle} in "
                              f"{PLACEMENT_TIMEOUT_S:.0f} s (cluster resources: {ray.cluster_resources()})")
        actor_cls = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(_RayWorker)
        self._actors = [actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=self._pg, placement_group_bundle_index=rank)).remote(self.config, rank, self.world_size)
            for rank in range(self.world_size)]
        try:
            ip, port = ray.get(self._actors[0].address.remote())
            infos = self._get([a.load.remote(f"tcp://{ip}:{port}") for a in self._actors])
        except BaseException:
            self.shutdown()
            raise
        return infos[0]

    def _get(self, refs: list) -> list:
        ray = self._ray
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:  # the actor method raised: re-raise the original error
            raise e.as_instanceof_cause() from None
        except ray.exceptions.RayActorError as e:
            raise ExecutorDeadError(f"a tensor-parallel rank (Ray actor) died: {e}") from None

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        ref = self._ray.put(sched)  # once into the object store, read by every rank
        return self._get([a.execute_model.remote(ref) for a in self._actors])[0]

    def shutdown(self) -> None:
        ray = self._ray
        if ray is None:
            return
        for a in self._actors:
            try:
                ray.get(a.shutdown.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a dead actor has nothing left to stop
                pass
            ray.kill(a)
        self._actors = []
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
            self._pg = None
