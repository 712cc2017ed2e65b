"""`tokenmill finetune`'s arguments, kept apart from the trainer so that building the CLI parser (every
`tokenmill` command, the router's included) does not import torch."""
from __future__ import annotations

from typing import Any


def _cmd_finetune(args: Any) -> int:
    from tokenmill.finetune.offline import cmd_finetune

    return cmd_finetune(args)


def add_finetune_args(sub: Any) -> None:
    from tokenmill.config import add_config_args

    p = sub.add_parser("finetune", help="train a LoRA adapter on a chat JSONL file (OpenAI's fine-tuning format)")
    p.add_argument("--data", required=True, help="JSONL file, one {\"messages\": [...]} example per line")
    p.add_argument("--out", required=True, help="folder for the PEFT adapter (adapter_config.json + "
                                                "adapter_model.safetensors)")
    p.add_argument("--n-epochs", type=int, default=None, help="epochs (default: 3)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per optimizer step (default: 1 per 10 "
                                                                "examples, 1 to 8)")
    p.add_argument("--learning-rate-multiplier", type=float, default=None, help="times 2e-4 (default: 1)")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default: 8)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--target-modules", nargs="+", default=None,
                   help="modules to adapt: all, or some of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj "
                        "(default: q_proj k_proj v_proj o_proj)")
    p.add_argument("--suffix", default=None, help="name suffix of the adapter (ft:<model>:<suffix>:<id>)")
    p.add_argument("--train-seed", type=int, default=None, help="seed of the LoRA initialisation and shuffling")
    add_config_args(p)
    p.set_defaults(func=_cmd_finetune)
