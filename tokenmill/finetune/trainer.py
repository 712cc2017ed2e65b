"""One fine-tuning job's training state: its LoRA weights, AdamW, and the walk over epochs and batches, run in
chunks of whole examples so the engine can price and bound each chunk.

An optimizer step covers `batch_size` examples; its examples may be spread over several chunks (gradient
accumulation). The loss is the mean cross-entropy over the batch's assistant tokens (each chunk's sum is
divided by the whole batch's count, so chunking does not change the gradient).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from tokenmill.finetune.data import TokenizedExample
from tokenmill.finetune.lora import LoRAWeights, lm_logits, lora_hidden

BASE_LEARNING_RATE = 2e-4  # learning_rate_multiplier scales this


@dataclass
class Hyperparameters:
    """Resolved hyperparameters of a job (the API's "auto" already replaced)."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    lora_rank: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    seed: int = 0

    @property
    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.learning_rate_multiplier


@dataclass
class ChunkResult:
    tokens: int  # real (unpadded) tokens trained
    padded_tokens: int  # rows x longest: what the forward computed
    attn_pairs: int  # causal attention pairs (query, key) of the chunk
    seconds: float
    step_loss: Optional[float] = None  # set when the chunk completed an optimizer step
    step: int = 0  # optimizer steps done so far


def chunk_cost(examples: list[TokenizedExample]) -> tuple[int, int]:
    """(padded tokens, attention pairs) of a chunk of examples padded to its longest."""
    longest = max(e.num_tokens for e in examples)
    return longest * len(examples), len(examples) * longest * (longest + 1) // 2


@dataclass
class Trainer:
    model: object
    examples: list[TokenizedExample]
    hp: Hyperparameters
    lora: LoRAWeights = field(init=False)
    step: int = 0
    trained_tokens: int = 0

    def __post_init__(self) -> None:
        self.lora = LoRAWeights.init(self.model, self.hp.lora_rank, self.hp.lora_alpha, self.hp.target_modules,
                                     self.hp.seed)
        self.opt = torch.optim.AdamW(self.lora.parameters(), lr=self.hp.learning_rate, weight_decay=0.0)
        self.device = self.model.model.embed_tokens.weight.device
        rng = random.Random(self.hp.seed)
        self._batches: list[list[int]] = []  # every optimizer step's example indices, in order
        for _ in range(self.hp.n_epochs):
            order = list(range(len(self.examples)))
            rng.shuffle(order)
            self._batches += [order[i:i + self.hp.batch_size] for i in range(0, len(order), self.hp.batch_size)]
        self.n_steps = len(self._batches)
        self._pos = 0  # examples of the current batch already run
        self._batch_loss = 0.0

    @property
    def total_steps(self) -> int:
        return self.n_steps

    @property
    def done(self) -> bool:
        return self.step >= self.n_steps

    def next_chunk(self, fits: Callable[[int, int], bool]) -> list[int]:
        """The longest run of the current batch's next examples whose (padded tokens, attention pairs) `fits`;
        empty when not even the next one does."""
        batch = self._batches[self.step]
        take: list[int] = []
        for idx in batch[self._pos:]:
            if not fits(*chunk_cost([self.examples[j] for j in take + [idx]])):
                break
            take.append(idx)
        return take

    def run_chunk(self, idxs: list[int]) -> ChunkResult:
        """Forward + backward over these examples (the next ones of the current batch); an optimizer step
        when they finish the batch."""
        t0 = time.perf_counter()
        exs = [self.examples[j] for j in idxs]
        batch = self._batches[self.step]
        batch_loss_tokens = sum(self.examples[j].num_loss_tokens for j in batch)
        longest = max(e.num_tokens for e in exs)
        ids = torch.zeros(len(exs), longest, dtype=torch.long)
        mask = torch.zeros(len(exs), longest, dtype=torch.float32)
        for r, e in enumerate(exs):
            ids[r, :e.num_tokens] = torch.tensor(e.input_ids)
            mask[r, :e.num_tokens] = torch.tensor(e.loss_mask, dtype=torch.float32)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.enable_grad():
            hidden = lora_hidden(self.model, self.lora, ids)  # [B, L, H]
            rows, cols = mask[:, 1:].nonzero(as_tuple=True)  # token t+1 is trained: predicted at t
            logits = lm_logits(self.model, hidden[rows, cols])  # [N, V]: only where the loss needs them
            loss = F.cross_entropy(logits, ids[rows, cols + 1], reduction="sum") / batch_loss_tokens
            loss.backward()
        self._batch_loss += float(loss.detach())
        self._pos += len(idxs)
        real = sum(e.num_tokens for e in exs)
        self.trained_tokens += real
        padded, pairs = chunk_cost(exs)
        res = ChunkResult(real, padded, pairs, 0.0)
        if self._pos >= len(batch):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            res.step_loss, self._batch_loss, self._pos = self._batch_loss, 0.0, 0
        res.step = self.step
        res.seconds = time.perf_counter() - t0
        return res

    def release(self) -> None:
        """Drop the LoRA weights, gradients and optimizer state."""
        self.opt.zero_grad(set_to_none=True)
        self.opt.state.clear()
        self.opt = None
        self.lora = None
        self.examples = []
        self._batches = []
