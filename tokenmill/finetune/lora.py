"""The training LoRA: low-rank deltas on a served model's linears, applied by a functional forward that reads
the served weights without changing them, and saved as a PEFT folder.

Target modules use the checkpoint (PEFT) names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj. The served model packs q|k|v and gate|up; a delta for q_proj is added to the q rows of the packed
output, and so on. delta(x) = (x A^T) B^T * alpha / r, A [r, in] (Kaiming-uniform, as PEFT), B [out, r] (zeros):
a fresh adapter leaves the model's outputs unchanged.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import torch
import torch.nn.functional as F

from tokenmill.errors import InvalidRequestError

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
Tensor = torch.Tensor


class FineTuneUnsupported(InvalidRequestError):
    """The served model cannot be fine-tuned in the engine (quantized weights, MoE, several ranks)."""


def dense_weight(linear: Any, what: str) -> tuple[Tensor, Optional[Tensor]]:
    """(weight [out, in], bias) of a plain float linear; quantized or sharded linears cannot be trained through."""
    from tokenmill.model.layers.linear import Linear

    w = getattr(linear, "weight", None)
    if not isinstance(linear, Linear) or not isinstance(w, Tensor) or not w.is_floating_point():
        raise FineTuneUnsupported(f"fine-tuning needs float weights, but {what} is {type(linear).__name__} "
                                  "(serve with --quantization none and one rank)", param="model")
    return w, linear.bias


def module_shapes(model: Any) -> list[dict[str, tuple[int, int]]]:
    """Per layer: target module -> (in_features, out_features); raises FineTuneUnsupported for other layers."""
    from tokenmill.model.layers.attention import SelfAttention
    from tokenmill.model.layers.mlp import GatedMLP

    from tokenmill.model.layers.embedding import LMHead, VocabEmbedding

    for what, mod, cls in (("the token embedding", model.model.embed_tokens, VocabEmbedding),
                           ("the LM head", model.lm_head, LMHead)):
        w = getattr(mod, "weight", None)
        if type(mod) is not cls or not isinstance(w, Tensor) or not w.is_floating_point():
            raise FineTuneUnsupported(f"fine-tuning needs float weights, but {what} is {type(mod).__name__} "
                                      "(serve with --quantization none and one rank)", param="model")
    out = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is not SelfAttention or type(mlp) is not GatedMLP:
            raise FineTuneUnsupported(f"fine-tuning supports dense decoder layers only; layer {i} has "
                                      f"{type(attn).__name__} / {type(mlp).__name__}", param="model")
        for name in ("qkv_proj", "o_proj"):
            dense_weight(getattr(attn, name), f"layer {i} {name}")
        for name in ("gate_up_proj", "down_proj"):
            dense_weight(getattr(mlp, name), f"layer {i} {name}")
        hidden = model.hidden_size
        q, kv = attn.q_size, attn.kv_size
        inter = mlp.down_proj.in_features
        out.append({"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
                    "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)})
    return out


class LoRAWeights:
    """A[layer][module] [r, in] and B[layer][module] [out, r], float32 leaves that require grad."""

    def __init__(self, rank: int, alpha: float, targets: tuple[str, ...], A: list[dict[str, Tensor]],
                 B: list[dict[str, Tensor]]):
        self.rank, self.alpha, self.targets = rank, float(alpha), tuple(targets)
        self.scaling = self.alpha / rank
        self.A, self.B = A, B

    @classmethod
    def init(cls, model: Any, rank: int, alpha: float, targets: tuple[str, ...], seed: int) -> "LoRAWeights":
        shapes = module_shapes(model)
        device = model.model.embed_tokens.weight.device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        A: list[dict[str, Tensor]] = []
        B: list[dict[str, Tensor]] = []
        for layer in shapes:
            a_l, b_l = {}, {}
            for name in targets:
                fan_in, fan_out = layer[name]
                bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear and PEFT use
                a = (torch.rand(rank, fan_in, generator=gen) * 2 - 1) * bound
                a_l[name] = a.to(device).requires_grad_(True)
                b_l[name] = torch.zeros(fan_out, rank, device=device, requires_grad=True)
            A.append(a_l)
            B.append(b_l)
        return cls(rank, alpha, targets, A, B)

    @classmethod
    def load_peft(cls, folder: str, device: Any = "cpu") -> "LoRAWeights":
        """A PEFT LoRA folder written by save_peft (or PEFT, same names) back into LoRAWeights."""
        from safetensors.torch import load_file

        with open(os.path.join(folder, "adapter_config.json")) as f:
            cfg = json.load(f)
        tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
        targets = tuple(sorted(cfg["target_modules"]))
        n = 1 + max(int(k.split(".layers.")[1].split(".")[0]) for k in tensors)
        A: list[dict[str, Tensor]] = [{} for _ in range(n)]
        B: list[dict[str, Tensor]] = [{} for _ in range(n)]
        for key, t in tensors.items():
            layer = int(key.split(".layers.")[1].split(".")[0])
            name = key.split(".")[-3]
            (A if ".lora_A." in key else B)[layer][name] = t.to(device)
        return cls(int(cfg["r"]), float(cfg["lora_alpha"]), targets, A, B)

    def parameters(self) -> list[Tensor]:
        return [t for layer in (*self.A, *self.B) for t in layer.values()]

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())

    def delta(self, layer: int, name: str, x: Tensor) -> Optional[Tensor]:
        """x [..., in] -> the low-rank delta [..., out] in x's dtype, or None for a module not targeted."""
        a = self.A[layer].get(name)
        if a is None:
            return None
        return (F.linear(F.linear(x.float(), a), self.B[layer][name]) * self.scaling).to(x.dtype)

    # ---- PEFT folder -----------------------------------------------------------------------------------
    def peft_state_dict(self) -> dict[str, Tensor]:
        out = {}
        for i, (a_l, b_l) in enumerate(zip(self.A, self.B)):
            for name in self.targets:
                block = "self_attn" if name in _ATTN else "mlp"
                prefix = f"base_model.model.model.layers.{i}.{block}.{name}"
                out[f"{prefix}.lora_A.weight"] = a_l[name].detach().float().cpu().contiguous()
                out[f"{prefix}.lora_B.weight"] = b_l[name].detach().float().cpu().contiguous()
        return out

    def save_peft(self, folder: str, base_model: str) -> None:
        """adapter_config.json + adapter_model.safetensors, as PEFT writes them (written to a temporary name
        first, so a folder that exists is whole)."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                  "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": 0.0, "bias": "none",
                  "target_modules": sorted(self.targets), "fan_in_fan_out": False, "inference_mode": True,
                  "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True}
        tmp = os.path.join(folder, ".adapter_model.safetensors.tmp")
        save_file(self.peft_state_dict(), tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(folder, "adapter_model.safetensors"))
        with open(os.path.join(folder, ".adapter_config.json.tmp"), "w") as f:
            json.dump(config, f, indent=2)
        os.replace(os.path.join(folder, ".adapter_config.json.tmp"), os.path.join(folder, "adapter_config.json"))


def _rms(x: Tensor, norm: Any) -> Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * xf.to(x.dtype)


def _add(y: Tensor, d: Optional[Tensor]) -> Tensor:
    return y if d is None else y + d


def lora_forward(model: Any, lora: Optional[LoRAWeights], input_ids: Tensor) -> Tensor:
    """input_ids [B, L] -> logits [B, L, V] float32 (lora_hidden, then the LM head)."""
    return lm_logits(model, lora_hidden(model, lora, input_ids))


def lm_logits(model: Any, hidden: Tensor) -> Tensor:
    """hidden [..., hidden] -> logits [..., V] float32 (training computes them only where the loss needs them)."""
    head = model.lm_head.weight
    if not isinstance(head, Tensor) or not head.is_floating_point():
        raise FineTuneUnsupported("fine-tuning needs a float LM head (serve with --quantization none)", param="model")
    return F.linear(hidden, head).float()


def lora_hidden(model: Any, lora: Optional[LoRAWeights], input_ids: Tensor) -> Tensor:
    """Dense causal forward of a padded batch with the LoRA deltas: input_ids [B, L] -> final hidden [B, L, H].

    Reads the served model's weights (never writes them; they do not require grad) and never touches its KV
    cache, so inference steps run unchanged between training chunks. Right padding needs no mask: causal
    attention keeps real tokens from seeing the pads after them.
    """
    from tokenmill.model.layers.rotary import RotaryEmbedding

    dm = model.model
    bsz, seq = input_ids.shape
    h = F.embedding(input_ids, dm.embed_tokens.weight)  # [B, L, hidden]
    positions = torch.arange(seq, device=input_ids.device)
    cos, sin = dm.rotary_emb.cos_sin(positions)  # [L, D]
    for i, layer in enumerate(dm.layers):
        attn = layer.self_attn
        d = (lambda name, x, i=i: lora.delta(i, name, x)) if lora is not None else (lambda name, x: None)
        x = _rms(h, layer.input_layernorm)
        w, b = dense_weight(attn.qkv_proj, f"layer {i} qkv_proj")
        q, k, v = F.linear(x, w, b).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k, v = _add(q, d("q_proj", x)), _add(k, d("k_proj", x)), _add(v, d("v_proj", x))
        if attn.qk_norm == "full":
            q, k = _rms(q, attn.q_norm), _rms(k, attn.k_norm)
        if attn.clip_qkv is not None:
            q, k, v = (t.clamp(-attn.clip_qkv, attn.clip_qkv) for t in (q, k, v))
        q = q.reshape(bsz, seq, attn.num_heads, attn.head_dim)  # [B, L, H, D]
        k = k.reshape(bsz, seq, attn.num_kv_heads, attn.head_dim)  # [B, L, Hkv, D]
        v = v.reshape(bsz, seq, attn.num_kv_heads, attn.head_dim)
        if attn.qk_norm == "head":
            q, k = _rms(q, attn.q_norm), _rms(k, attn.k_norm)
        q, k = RotaryEmbedding.apply(q, cos, sin), RotaryEmbedding.apply(k, cos, sin)
        o = _attention(q, k, v, attn.attn.scale, attn.attn.sliding_window)  # [B, L, H * D]
        w, b = dense_weight(attn.o_proj, f"layer {i} o_proj")
        h = h + _add(F.linear(o, w, b), d("o_proj", o))
        x = _rms(h, layer.post_attention_layernorm)
        mlp = layer.mlp
        w, b = dense_weight(mlp.gate_up_proj, f"layer {i} gate_up_proj")
        gate, up = F.linear(x, w, b).chunk(2, dim=-1)  # [B, L, I] each
        gate, up = _add(gate, d("gate_proj", x)), _add(up, d("up_proj", x))
        a = F.silu(gate) * up
        w, b = dense_weight(mlp.down_proj, f"layer {i} down_proj")
        h = h + _add(F.linear(a, w, b), d("down_proj", a))
    return _rms(h, dm.norm)  # [B, L, hidden]


def _attention(q: Tensor, k: Tensor, v: Tensor, scale: float, window: Optional[int]) -> Tensor:
    """Causal (optionally sliding-window) attention, GQA by repeating K/V heads. q [B, L, H, D] -> [B, L, H*D]."""
    bsz, seq, heads, dim = q.shape
    rep = heads // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if window is None or window >= seq:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        i = torch.arange(seq, device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)  # [L, L] key j visible to query i
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o.transpose(1, 2).reshape(bsz, seq, heads * dim)
