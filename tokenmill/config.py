"""Engine configuration: a few dataclasses with documented fields. CLI flags are generated from them
(see `add_config_args` / `config_from_args`): each field's `help` metadata is its documentation."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, get_type_hints

from tokenmill.errors import ConfigError
from tokenmill.lora.config import LoRAConfig


def _f(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    model: Optional[str] = _f(None, "Hugging Face model folder or .gguf file (default: the bundled "
                                    "SmolLM2-135M-Instruct GGUF)")
    tokenizer: Optional[str] = _f(None, "tokenizer folder (default: the model's own)")
    dtype: str = _f("auto", "weights/activations dtype: auto (bfloat16 on GPU, float32 on CPU), "
                            "float32, bfloat16, float16", choices=["auto", "float32", "bfloat16", "float16"])
    load_format: str = _f("auto", "auto, safetensors, gguf, or dummy (random weights for the config)",
                          choices=["auto", "safetensors", "gguf", "dummy"])
    quantization: str = _f("auto", "GGUF weights: auto (keep Q4_0/Q4_1/Q8_0 tensors packed and run them with the "
                                   "compiled CPU kernels, float32 on CPU only), none (dequantize at load)",
                           choices=["auto", "none"])
    gemm_dtype: str = _f("auto", "dtype of the dense weight copy that packed GGUF weights use for calls of many "
                                 "rows (prefill chunks, large decode batches): auto (bfloat16 where the CPU has "
                                 "bf16 matrix instructions, AMX or AVX512-BF16, else float32; on AMX CPUs the "
                                 "k-quants' 1-3 row decode calls also take int8 activations; on AVX512-VNNI "
                                 "CPUs without AMX a GGUF's block-quantized weights take int8 panels, x rounded "
                                 "to 8 bits per 64 values), float32 (exact against the dequantized weights), "
                                 "bfloat16, int8 (int8 panels for a GGUF's block-quantized weights: needs "
                                 "AVX512-VNNI)",
                         choices=["auto", "float32", "bfloat16", "int8"])
    max_model_len: Optional[int] = _f(None, "longest sequence (prompt + output); default: the model's")
    seed: int = _f(0, "seed of the engine's random generator (requests without their own seed)")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    served_model_name: Optional[str] = _f(None, "model name reported by the API (default: derived from --model)")
    num_threads: Optional[int] = _f(None, "CPU threads for torch (default: all cores)")
    attention_backend: str = _f("auto", "attention kernels: auto (triton on GPU when importable; on CPU the "
                                        "compiled cpu kernel when it builds; else reference), reference (PyTorch), "
                                        "cpu (C/OpenMP kernel), triton", choices=["auto", "reference", "cpu", "triton"])
    enforce_eager: bool = _f(False, "disable CUDA graphs: run every forward eagerly")
    skip_tokenizer_init: bool = _f(False, "load no tokenizer: prompts must be token ids, outputs carry no text")
    moe_expert_cache_gb: Optional[float] = _f(None, "MoE models on CUDA: GiB of device memory for a cache of "
                                                    "experts; the rest stay in host memory and run on the CPU "
                                                    "or are fetched, by a cost model (docs/MOE.md)")
    moe_expert_prefetch: bool = _f(False, "with moe_expert_cache_gb: prefetch the experts the next layer's gate "
                                          "predicts from the current hidden state, overlapped with compute")

    def validate(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.quantization not in ("auto", "none"):
            raise ConfigError(f"unknown quantization {self.quantization!r}; choose auto or none", param="quantization")
        if self.gemm_dtype not in ("auto", "float32", "bfloat16", "int8"):
            raise ConfigError(f"unknown gemm_dtype {self.gemm_dtype!r}; choose auto, float32, bfloat16 or int8",
                              param="gemm_dtype")
        if self.attention_backend not in ("auto", "reference", "cpu", "triton"):
            raise ConfigError(f"unknown attention_backend {self.attention_backend!r}; choose auto, reference, "
                              "cpu or triton", param="attention_backend")
        if self.moe_expert_cache_gb is not None:
            if not self.moe_expert_cache_gb > 0:
                raise ConfigError(f"moe_expert_cache_gb must be positive, got {self.moe_expert_cache_gb}",
                                  param="moe_expert_cache_gb")
            if self.device == "cpu":
                raise ConfigError("moe_expert_cache_gb needs a CUDA device: on the CPU every expert already runs "
                                  "from host memory", param="moe_expert_cache_gb")
        if self.moe_expert_prefetch and self.moe_expert_cache_gb is None:
            raise ConfigError("moe_expert_prefetch needs moe_expert_cache_gb", param="moe_expert_prefetch")
        if self.attention_backend == "triton" and importlib.util.find_spec("triton") is None:
            raise ConfigError("attention_backend 'triton' asked for, but the triton package is not installed",
                              param="attention_backend")


@dataclass
class CacheConfig:
    block_size: int = _f(16, "tokens per KV-cache block")
    num_kv_blocks: Optional[int] = _f(None, "number of KV blocks (overrides the memory-based sizing)")
    kv_cache_memory: Optional[float] = _f(None, "GiB of memory for the KV cache (default on CPU: 1 GiB)")
    gpu_memory_utilization: float = _f(0.9, "fraction of GPU memory the engine may use in total")
    enable_prefix_caching: bool = _f(True, "reuse the KV of identical prompt prefixes")
    kv_cache_dtype: str = _f("auto", "KV cache dtype: auto (bfloat16 on a CPU whose attention kernel reads bf16 K/V in "
                                     "place, i.e. AVX-512, when the model computes in float32; else the model "
                                     "dtype), float32 (exact K/V, what the transformers-equality tests use), "
                                     "bfloat16 (half the bytes of float32), fp8, int8",
                             choices=["auto", "float32", "bfloat16", "fp8", "int8"])
    cpu_offload_gb: float = _f(0.0, "GiB of (pinned) host memory for a second KV tier: evicted prefix-cache blocks "
                                    "and the KV of preempted requests are copied there and back instead of "
                                    "recomputed (0: off; brings nothing on a CPU device)")
    streaming_sink_tokens: int = _f(4, "kv_eviction='streaming' requests: attention-sink tokens kept at the start "
                                       "(rounded up to whole blocks)")
    streaming_window_tokens: int = _f(1024, "kv_eviction='streaming' requests: most recent tokens kept (rounded up "
                                            "to whole blocks, at least 2); a longer prompt is refused")

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ConfigError(f"num_kv_blocks must be at least 2, got {self.num_kv_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        kv_dtypes = next(f for f in fields(self) if f.name == "kv_cache_dtype").metadata["choices"]
        if self.kv_cache_dtype not in kv_dtypes:
            raise ConfigError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r}; choose one of {', '.join(kv_dtypes)}",
                              param="kv_cache_dtype")
        if self.cpu_offload_gb < 0:
            raise ConfigError(f"cpu_offload_gb must be >= 0, got {self.cpu_offload_gb}")
        if self.streaming_sink_tokens < 0:
            raise ConfigError(f"streaming_sink_tokens must be >= 0, got {self.streaming_sink_tokens}")
        if -(-self.streaming_window_tokens // self.block_size) < 2:
            raise ConfigError(f"streaming_window_tokens must span at least 2 blocks of {self.block_size}, "
                              f"got {self.streaming_window_tokens}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = _f(128, "most requests in one step")
    max_num_batched_tokens: int = _f(2048, "token budget of one step (prefill chunks + decodes)")
    policy: str = _f("fcfs", "queue policy: fcfs, priority, slo, fair", choices=["fcfs", "priority", "slo", "fair"])
    max_waiting_requests: Optional[int] = _f(None, "reject new requests (429) when this many are queued beyond "
                                                   "the free seats of max_num_seqs (default: no limit)")
    long_prefill_token_threshold: int = _f(0, "a prompt longer than this counts as a long prefill (0: off)")
    max_long_partial_prefills: int = _f(1, "long prefills allowed to run at once (with the threshold set)")
    slo_reject: bool = _f(False, "with policy slo: reject requests that can no longer meet their target")
    slo_ttft_ms: Optional[float] = _f(None, "server-wide time-to-first-token target (ms) for requests without "
                                            "their own slo (used by policy slo)")
    slo_tpot_ms: Optional[float] = _f(None, "server-wide time-per-output-token target (ms), likewise")
    slo_calibration: Optional[str] = _f(None, "policy slo: step-time model from `tokenmill plan --calibrate "
                                              "--save-calibration FILE` (default: learned online)")
    prefix_aware_window: int = _f(16, "fcfs: admit first, among this many oldest waiting requests, the one with "
                                      "the longest cached prefix (1: strict FCFS)")
    prefix_aware_max_skips: int = _f(8, "a waiting request passed over this many times is admitted next")
    step_trace: Optional[str] = _f(None, "append one JSON line per engine step to this file (wall-clock start, "
                                         "seconds, scheduled tokens, requests, KV tokens read, attention pairs): "
                                         "what `bench/goodput_validate.py` compares with the cost model")

    def validate(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 1:
            raise ConfigError(f"max_waiting_requests must be at least 1 (or unset for no limit), got "
                              f"{self.max_waiting_requests}", param="max_waiting_requests")
        if self.slo_calibration is not None:
            if self.policy != "slo":
                raise ConfigError("slo_calibration is used by policy slo only", param="slo_calibration")
            if not os.path.isfile(self.slo_calibration):
                raise ConfigError(f"calibration file not found: {self.slo_calibration}", param="slo_calibration")
        if self.step_trace is not None:
            folder = os.path.dirname(os.path.abspath(self.step_trace))
            if os.path.isdir(self.step_trace) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
                raise ConfigError(f"step_trace: cannot write a file at {self.step_trace}", param="step_trace")


@dataclass
class SpecConfig:
    speculative_method: Optional[str] = _f(None, "speculative decoding: ngram (default off)", choices=["ngram"])
    num_speculative_tokens: int = _f(4, "draft tokens proposed per step")
    ngram_max: int = _f(4, "longest n-gram the ngram proposer matches")
    ngram_min: int = _f(1, "shortest n-gram the ngram proposer matches")


@dataclass
class StructuredOutputsConfig:
    jump_forward: str = _f("draft", "constrained decoding: skip the steps of tokens a grammar forces. tokens: "
                                    "append, unsampled, a token that is the only one allowed; draft: that, and "
                                    "propose the forced string's tokens as draft tokens the next step verifies "
                                    "(both exact: distributed as token-by-token decoding); string: append "
                                    "the forced string's tokens unverified (fewest steps, but the text after "
                                    "them can differ); off",
                           choices=["off", "tokens", "draft", "string"])
    grammar_cache_size: int = _f(256, "compiled grammars kept for reuse (LRU)")
    grammar_compile_threads: int = _f(1, "threads that compile grammars, off the engine's step loop")

    def validate(self) -> None:
        if self.jump_forward not in ("off", "tokens", "draft", "string"):
            raise ConfigError(f"unknown jump_forward {self.jump_forward!r}; choose off, tokens, draft or string",
                              param="jump_forward")
        if self.grammar_cache_size < 1:
            raise ConfigError(f"grammar_cache_size must be at least 1, got {self.grammar_cache_size}",
                              param="grammar_cache_size")
        if self.grammar_compile_threads < 1:
            raise ConfigError(f"grammar_compile_threads must be at least 1, got {self.grammar_compile_threads}",
                              param="grammar_compile_threads")


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = _f(1, "tensor parallelism: ranks (processes or Ray actors) that each hold a 1/N "
                                      "slice of every layer; gloo on CPU, NCCL on CUDA")
    distributed_executor_backend: str = _f("auto", "how the ranks run: auto (in the engine process for one rank, "
                                                   "else mp), uni (in the engine process, one rank only), mp (one "
                                                   "worker process per rank on this machine), ray (one Ray actor "
                                                   "per rank, on an existing Ray cluster)",
                                           choices=["auto", "uni", "mp", "ray"])
    enable_expert_parallel: bool = _f(False, "MoE models under tensor parallelism: each rank holds num_experts / N "
                                             "whole experts and runs the tokens routed to them (expert "
                                             "parallelism), instead of a 1/N slice of every expert")
    ray_address: Optional[str] = _f(None, "backend ray: the cluster to join, e.g. 10.0.0.1:6379 (default: "
                                          "what ray.init() finds, else a local Ray started for the engine)")

    @property
    def backend(self) -> str:
        """The executor backend actually used (auto resolved)."""
        if self.distributed_executor_backend == "auto":
            return "uni" if self.tensor_parallel_size == 1 else "mp"
        return self.distributed_executor_backend

    def validate(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.backend == "uni" and self.tensor_parallel_size > 1:
            raise ConfigError("distributed_executor_backend uni runs one rank: use mp or ray for "
                              f"tensor_parallel_size {self.tensor_parallel_size}")


@dataclass
class FinetuneConfig:
    finetune_max_step_tokens: int = _f(512, "fine-tuning co-served with inference: most padded tokens of one "
                                            "training chunk (a training example may not be longer)")
    finetune_max_step_ms: float = _f(100.0, "fine-tuning: predicted time limit of one training chunk, with no "
                                            "traffic too (a new request waits at most about this long); with "
                                            "traffic a chunk also fits what --slo-tpot-ms leaves of the step")
    finetune_threads: int = _f(1, "CPU threads torch uses for a training chunk (0: torch's own setting). One by "
                                  "default: on a busy CPU torch's spinning thread pool made chunks up to 10x slower "
                                  "(docs/FINETUNE.md), and it leaves the other cores to serving")

    def validate(self) -> None:
        if self.finetune_max_step_tokens < 2:
            raise ConfigError(f"finetune_max_step_tokens must be at least 2, got {self.finetune_max_step_tokens}",
                              param="finetune_max_step_tokens")
        if self.finetune_threads < 0:
            raise ConfigError(f"finetune_threads must be >= 0, got {self.finetune_threads}", param="finetune_threads")
        if not self.finetune_max_step_ms > 0:
            raise ConfigError(f"finetune_max_step_ms must be positive, got {self.finetune_max_step_ms}",
                              param="finetune_max_step_ms")


@dataclass
class KVTransferConfig:
    """Disaggregated prefill / decode (docs/DISAGG.md): a producer (prefill instance) serves the KV blocks of the
    requests it prefilled; a consumer (decode instance) pulls them into its own blocks and continues."""

    kv_role: Optional[str] = _f(None, "disaggregated serving role: producer (prefill instance: serves its KV blocks), "
                                      "consumer (decode instance: pulls them), both; default off",
                                choices=["producer", "consumer", "both"])
    kv_connector: str = _f("tcp", "KV transfer connector: tcp (block ids + bytes over TCP, any KV dtype)",
                           choices=["tcp"])
    kv_transfer_host: str = _f("127.0.0.1", "producer: address its KV server listens on and advertises to consumers")
    kv_transfer_port: int = _f(14579, "producer: TCP port of its KV server")
    kv_transfer_timeout: float = _f(10.0, "seconds a producer holds a prefilled request's blocks for a consumer, "
                                          "and a consumer waits on a transfer before recomputing the prompt")

    def validate(self) -> None:
        if self.kv_role not in (None, "producer", "consumer", "both"):
            raise ConfigError(f"kv_role must be producer, consumer or both, got {self.kv_role!r}")
        if self.kv_connector != "tcp":
            raise ConfigError(f"kv_connector must be tcp, got {self.kv_connector!r}")
        if not 1 <= self.kv_transfer_port <= 65535:
            raise ConfigError(f"kv_transfer_port must be in [1, 65535], got {self.kv_transfer_port}")
        if not self.kv_transfer_timeout > 0:
            raise ConfigError(f"kv_transfer_timeout must be positive, got {self.kv_transfer_timeout}")

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("producer", "both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("consumer", "both")


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    structured: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)

    def validate(self) -> None:
        self.model.validate()
        self.cache.validate()
        self.scheduler.validate()
        self.structured.validate()
        self.parallel.validate()
        self.finetune.validate()
        self.lora.validate()
        if self.lora.enable_lora and self.parallel.tensor_parallel_size > 1:
            raise ConfigError("enable_lora runs on one rank: tensor_parallel_size must be 1", param="enable_lora")
        self.kv_transfer.validate()
        if self.kv_transfer.kv_role is not None and self.parallel.tensor_parallel_size > 1:
            raise ConfigError("kv_role (disaggregated prefill/decode) needs tensor_parallel_size 1")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build from flat engine args (dtype=..., block_size=...), as LLM(**engine_args) takes them."""
        parts = {name: {} for name in _SECTIONS}
        for key, value in kwargs.items():
            for name, sec in _SECTIONS.items():
                if key in {f.name for f in fields(sec)}:
                    parts[name][key] = value
                    break
            else:
                raise ConfigError(f"unknown engine argument {key!r}")
        cfg = cls(**{name: _SECTIONS[name](**vals) for name, vals in parts.items()})
        cfg.validate()
        return cfg

    def to_kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in _SECTIONS:
            out.update(dataclasses.asdict(getattr(self, name)))
        return out


_SECTIONS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "spec": SpecConfig,
             "structured": StructuredOutputsConfig, "parallel": ParallelConfig, "finetune": FinetuneConfig,
             "lora": LoRAConfig, "kv_transfer": KVTransferConfig}


def add_dataclass_args(group: Any, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one --flag per field of the config dataclass `cls` to an argparse parser or group (underscores
    become dashes; help and choices from the field metadata; bools get --flag/--no-flag). Flags default to
    argparse.SUPPRESS, so only flags given on the command line reach the config. The one flag generator:
    the engine sections here and ServerConfig (server/config.py) both use it."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
        typ = hints[f.name]
        if typ is bool or typ == Optional[bool]:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {Optional[int]: int, Optional[float]: float, Optional[str]: str}.get(typ, typ)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            if "nargs" in f.metadata:  # a list field: --flag a b c
                kw["nargs"], kw["type"] = f.metadata["nargs"], str
        group.add_argument("--" + f.name.replace("_", "-"), **kw)


def add_config_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add one --flag per engine config field, one argument group per section."""
    for name, sec in _SECTIONS.items():
        add_dataclass_args(parser.add_argument_group(f"{name} options"), sec, skip)


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for sec in _SECTIONS.values() for f in fields(sec)}
    return EngineConfig.from_kwargs(**{k: v for k, v in vars(args).items() if k in names})
