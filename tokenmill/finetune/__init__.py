"""Fine-tuning co-served with inference: LoRA jobs trained inside the engine (docs/FINETUNE.md)."""
