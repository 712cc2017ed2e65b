"""Write an OLMoE-shaped Hugging Face checkpoint with random bf16 weights, for the MoE benchmarks (issue #21):
config.json, the bundled SmolLM2 tokenizer (so llama.cpp's converter recognizes its pre-tokenizer; the vocabulary
is therefore SmolLM2's 49152 tokens instead of OLMoE's 50304) and one safetensors shard per layer, experts one
tensor each (`mlp.experts.E.{gate,up,down}_proj.weight`, the layout of allenai/OLMoE-1B-7B-0924 that
llama.cpp's convert_hf_to_gguf.py merges into 3-D ffn_*_exps). Nothing is downloaded.

    python bench/random_moe_checkpoint.py OUT_DIR                 # OLMoE-1B-7B: 16 layers, 64 experts, top 8
    python bench/random_moe_checkpoint.py OUT_DIR --layers 4      # same layer shape, fewer layers

Weights ~ N(0, 0.02) (norms 1), so routing is close to uniform over the experts: every expert gets used, the
worst case for an expert cache and the typical case for a CPU that streams all experts anyway.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import save_file


def olmoe_config(args: argparse.Namespace, vocab: int, bos: int, eos: int) -> dict:
    return {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "vocab_size": vocab,
        "hidden_size": args.hidden, "intermediate_size": args.inter, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.heads, "num_experts": args.experts,
        "num_experts_per_tok": args.top_k, "norm_topk_prob": False, "clip_qkv": None,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos,
        "output_router_logits": False, "router_aux_loss_coef": 0.01, "torch_dtype": "bfloat16",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=1024, help="per-expert intermediate size")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from tokenmill.model.loader import default_model_path

    os.makedirs(args.out, exist_ok=True)
    gguf = default_model_path()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    tok.save_pretrained(args.out)
    vocab = len(tok)
    cfg = olmoe_config(args, vocab, tok.bos_token_id or 0, tok.eos_token_id or 0)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    g = torch.Generator().manual_seed(args.seed)
    h, inter, e = args.hidden, args.inter, args.experts

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    index: dict[str, str] = {}
    total = 0

    def write(shard: str, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        save_file(tensors, os.path.join(args.out, shard), metadata={"format": "pt"})
        index.update({k: shard for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    t0 = time.time()
    write("embed.safetensors", {"model.embed_tokens.weight": rand(vocab, h), "lm_head.weight": rand(vocab, h),
                                "model.norm.weight": ones(h)})
    for i in range(args.layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h),
             p + "self_attn.q_norm.weight": ones(h), p + "self_attn.k_norm.weight": ones(h),
             p + "mlp.gate.weight": rand(e, h)}
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{name}.weight"] = rand(h, h)
        for x in range(e):
            t[p + f"mlp.experts.{x}.gate_proj.weight"] = rand(inter, h)
            t[p + f"mlp.experts.{x}.up_proj.weight"] = rand(inter, h)
            t[p + f"mlp.experts.{x}.down_proj.weight"] = rand(h, inter)
        write(f"layer-{i:03d}.safetensors", t)
        print(f"layer {i + 1}/{args.layers} written ({time.time() - t0:.0f} s)", file=sys.stderr)
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f, indent=1)
    print(f"{args.out}: {total / 2**30:.2f} GiB of bf16 weights, vocab {vocab}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
