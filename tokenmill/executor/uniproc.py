"""UniProcExecutor: one rank, the model runner in the engine's own process (the default for one device)."""
from __future__ import annotations

from typing import Optional

from tokenmill.config import EngineConfig
from tokenmill.core.outputs import ModelRunnerOutput, SchedulerOutput
from tokenmill.executor.base import Executor, ModelInfo


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig):
        from tokenmill.worker.model_runner import ModelRunner

        super().__init__(config)
        self._runner: Optional[ModelRunner] = ModelRunner(config)

    def load(self) -> ModelInfo:
        if self._runner.model is None:
            self._runner.load()
        return self._runner.model_info()

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self._runner.execute_model(sched)

    def shutdown(self) -> None:
        if self._runner.kv_connector is not None:  # its listening socket and threads
            self._runner.kv_connector.shutdown()
        # the runner's tensors go with the executor

    @property
    def runner(self):
        return self._runner
