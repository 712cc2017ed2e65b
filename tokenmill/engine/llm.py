"""LLM: the offline facade, with vLLM's names (LLM, SamplingParams, generate, chat)."""
from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence, Union

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

PromptType = Union[str, list[int], dict]


class LLM:
    """Load a model and generate offline.

    >>> llm = LLM()                      # the bundled SmolLM2-135M-Instruct GGUF
    >>> llm.generate("Hello", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    Engine args: dtype, block_size, max_num_seqs, max_num_batched_tokens, max_model_len, num_kv_blocks,
    load_format, seed, device (and every other field of tokenmill.config).
    """

    def __init__(self, model: Optional[str] = None, **engine_args: Any):
        self.config = EngineConfig.from_kwargs(model=model, **engine_args)
        self.engine = LLMEngine.from_config(self.config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the executor's ranks (worker processes, Ray actors); a no-op for the in-process executor."""
        self.engine.shutdown()

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True, lora_request: Any = None) -> list[RequestOutput]:
        """Generate for one or many prompts: strings, token-id lists, or {"prompt_token_ids": [...]}.
        lora_request: a tokenmill.LoRARequest for every prompt, or a list of them (None entries: the base model);
        an adapter not yet loaded is loaded first (needs enable_lora=True)."""
        plist = _as_prompt_list(prompts)
        params = _params_list(sampling_params, len(plist))
        loras = list(lora_request) if isinstance(lora_request, (list, tuple)) else [lora_request] * len(plist)
        if len(loras) != len(plist):
            raise InvalidRequestError(f"got {len(loras)} lora requests for {len(plist)} prompts", param="lora_request")
        for lr in loras:
            if lr is not None and lr.lora_int_id not in self.engine.lora_requests:
                self.engine.add_lora(lr)
        prepared = []
        for p, sp, lr in zip(plist, params, loras):  # validate everything before starting anything
            text, ids = _split_prompt(p)
            prepared.append((text, sp, self.engine.prepare(text, sp, ids), lr))
        return self._run(prepared, use_tqdm)

    def add_lora(self, lora_request: Any) -> bool:
        return self.engine.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.engine.remove_lora(lora_int_id)

    def list_loras(self) -> set[int]:
        return self.engine.list_loras()

    def chat(self, messages: Union[list[dict], Sequence[list[dict]]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, chat_template: Optional[str] = None,
             tools: Optional[list[dict]] = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        if messages and isinstance(messages[0], dict):
            convs = [messages]
        else:
            convs = list(messages)
        ids = [self.engine.processor.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                                         tools=tools, chat_template=chat_template) for c in convs]
        return self.generate([{"prompt_token_ids": i} for i in ids], sampling_params, use_tqdm)

    def _run(self, prepared, use_tqdm: bool) -> list[RequestOutput]:
        order = {}
        for text, sp, prep, *lr in prepared:
            rid = str(next(self._ids))
            order[rid] = len(order)
            self.engine.add_request(rid, text, sp, prepared=prep, lora_request=lr[0] if lr else None)
        results: list[Optional[RequestOutput]] = [None] * len(order)
        bar = None
        if use_tqdm and len(order) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), desc="generate", unit="req", dynamic_ncols=True)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[order[out.request_id]] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in order:
                self.engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise InvalidRequestError("no prompts given", param="prompts")
        if all(isinstance(t, int) for t in prompts):
            return [list(prompts)]
        return list(prompts)
    raise InvalidRequestError(f"prompts must be a string, token ids or a list of those, got {type(prompts).__name__}",
                              param="prompts")


def _split_prompt(p: PromptType) -> tuple[Optional[str], Optional[list[int]]]:
    if isinstance(p, str):
        return p, None
    if isinstance(p, dict):
        if "prompt_token_ids" in p:
            return p.get("prompt"), list(p["prompt_token_ids"])
        if "prompt" in p:
            return p["prompt"], None
        raise InvalidRequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'", param="prompts")
    if isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
        return None, list(p)
    raise InvalidRequestError(f"unsupported prompt of type {type(p).__name__}", param="prompts")


def _params_list(sp, n: int) -> list[SamplingParams]:
    if sp is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(sp, SamplingParams):
        return [sp] * n
    sp = list(sp)
    if len(sp) != n:
        raise InvalidRequestError(f"got {len(sp)} sampling params for {n} prompts", param="sampling_params")
    return sp
