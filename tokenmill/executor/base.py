"""The executor seam: what EngineCore calls to run the model, wherever the ranks live.

`EngineCore` holds one `Executor`. `load()` starts the ranks, loads the model on each and returns a
`ModelInfo` handshake: everything the engine needs to know about the model (lengths, KV blocks, EOS ids,
vocabulary). `execute_model(SchedulerOutput) -> ModelRunnerOutput` runs one step on every rank; rank 0's
output is the answer. Only those two dataclasses (and the handshake) cross a process boundary.

Executors: `UniProcExecutor` (the runner in the engine's own process), `MultiprocExecutor` (one worker
process per rank, this machine), `RayExecutor` (one Ray actor per rank, a Ray cluster).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from tokenmill.config import EngineConfig
from tokenmill.core.outputs import ModelRunnerOutput, SchedulerOutput


class ExecutorDeadError(RuntimeError):
    """A rank (worker process, Ray actor) is gone: no step can run any more. Never caught per step."""


@dataclass
class ModelInfo:
    """The load handshake: model facts the engine needs, read once from rank 0 after loading."""

    max_model_len: int  # after the KV cache sizing (may be lower than the model's)
    num_kv_blocks: int  # device KV blocks (block 0 is the null block)
    num_host_blocks: int  # CPU offload tier blocks (0: no tier)
    vocab_size: int  # rows of the LM head: token ids >= this are rejected
    eos_token_ids: tuple[int, ...]  # from the model's config (the tokenizer adds its own)
    supports_kv_streaming: bool  # RoPE and an unquantized cache: kv_eviction="streaming" possible
    model_path: str  # where the model lives (the tokenizer is loaded from here)
    kv_cache_dtype: str = "float32"  # resolved (kv_quant.resolve_kv_cache_dtype): float32, bfloat16, float16, int8, fp8
    gguf_file: Optional[str] = None
    dtype: str = "float32"
    device: str = "cpu"
    world_size: int = 1
    load_time_s: float = 0.0
    # enable_lora: what adapters may target (tokenmill.lora.adapter.target_shapes_of); None without LoRA
    lora_shapes: Optional[dict] = None


class Executor:
    """Runs the model for EngineCore. Subclasses start ranks in load() and stop them in shutdown()."""

    def __init__(self, config: EngineConfig):
        self.config = config

    def load(self) -> ModelInfo:
        raise NotImplementedError

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError

    @property
    def runner(self) -> Any:
        """The in-process ModelRunner, for tests and diagnostics (calibration); other executors have none."""
        raise AttributeError(f"{type(self).__name__} runs the model outside this process: it has no runner")


def make_executor(config: EngineConfig) -> Executor:
    backend = config.parallel.backend
    if backend == "uni":
        from tokenmill.executor.uniproc import UniProcExecutor

        return UniProcExecutor(config)
    if backend == "mp":
        from tokenmill.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config)
    from tokenmill.executor.ray_executor import RayExecutor

    return RayExecutor(config)
