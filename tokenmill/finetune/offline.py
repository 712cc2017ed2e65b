"""Fine-tuning without a server: `tokenmill finetune --model M --data F.jsonl --out DIR`, and the helpers the
server shares (job specs from a parsed file). The job runs through the same EngineCore step loop as a served
one: with no traffic, each step is one training chunk."""
from __future__ import annotations

import sys
import uuid
from typing import Any, Callable, Optional

from tokenmill.finetune.data import parse_chat_jsonl, tokenize_examples
from tokenmill.finetune.jobs import JobSpec, JobUpdate, check_suffix, resolve_hyperparameters
from tokenmill.finetune.trainer import Hyperparameters


def fine_tuned_name(base: str, suffix: Optional[str], job_id: str) -> str:
    """ft:<base>:<suffix>:<job id tail> (OpenAI's shape; the tail keeps two jobs with one suffix apart)."""
    tail = job_id.rsplit("-", 1)[-1][:8]
    return f"ft:{base}:{suffix}:{tail}" if suffix else f"ft:{base}:{tail}"


def new_job_id() -> str:
    return f"ftjob-{uuid.uuid4().hex[:24]}"


def make_spec(processor: Any, examples: list, hp: Hyperparameters, job_id: str, out_dir: str, base_model: str,
              fine_tuned_model: str, max_step_tokens: int) -> JobSpec:
    """Tokenize parsed examples with the processor's chat template (errors name the example's line)."""
    def render(msgs: list, add_generation_prompt: bool) -> list[int]:
        return processor.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)

    limit = min(max_step_tokens, processor.max_model_len)
    toks = tokenize_examples(examples, render, max_tokens=limit)
    return JobSpec(job_id, toks, hp, out_dir, base_model, fine_tuned_model)


def run_to_end(core: Any, job_id: str, on_update: Callable[[JobUpdate], None]) -> JobUpdate:
    """Step the engine core until the job ends; returns its last update."""
    last: Optional[JobUpdate] = None
    while core.has_work() or core.has_training():
        core.step()
        for u in core.finetune.take_updates():
            on_update(u)
            if u.job_id == job_id:
                last = u
    for u in core.finetune.take_updates():
        on_update(u)
        last = u if u.job_id == job_id else last
    return last


def cmd_finetune(args: Any) -> int:
    """The CLI command: parse and check the file, train, write the PEFT folder to --out."""
    import os

    from tokenmill.config import config_from_args
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.errors import InvalidRequestError

    try:
        with open(args.data, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InvalidRequestError(f"cannot read {args.data}: {e.strerror}", param="data") from None
    examples = parse_chat_jsonl(data, param="data")
    suffix = check_suffix(args.suffix)
    hyper = {k: v for k, v in (("n_epochs", args.n_epochs), ("batch_size", args.batch_size),
                               ("learning_rate_multiplier", args.learning_rate_multiplier)) if v is not None}
    extras: dict[str, Any] = {k: v for k, v in (("lora_rank", args.lora_rank), ("lora_alpha", args.lora_alpha))
                              if v is not None}
    if args.target_modules:
        extras["target_modules"] = "all" if args.target_modules == ["all"] else args.target_modules
    hp = resolve_hyperparameters(hyper, extras, len(examples), args.train_seed)
    cfg = config_from_args(args)
    engine = LLMEngine.from_config(cfg)
    try:
        job_id = new_job_id()
        name = fine_tuned_name(engine.model_name, suffix, job_id)
        spec = make_spec(engine.processor, examples, hp, job_id, os.path.abspath(args.out), engine.model_name,
                         name, cfg.finetune.finetune_max_step_tokens)
        engine.core.finetune.submit(spec)

        def show(u: JobUpdate) -> None:
            for ev in u.events:
                print(ev.message, file=sys.stderr, flush=True)

        last = run_to_end(engine.core, job_id, show)
    finally:
        engine.shutdown()
    if last is None or last.status != "succeeded":
        msg = (last.error or {}).get("message") if last is not None else "the job did not run"
        raise InvalidRequestError(f"fine-tuning failed: {msg}")
    print(f"adapter {name} written to {args.out}")
    return 0
