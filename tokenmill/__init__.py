"""tokenmill: an LLM inference and serving engine.

`from tokenmill import LLM, SamplingParams` (heavy modules are imported on first use, so that
`tokenmill.core` stays importable without torch)."""
from tokenmill.sampling_params import SLO, SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"
__all__ = ["LLM", "LoRARequest", "SamplingParams", "StructuredOutputsParams", "SLO", "RequestOutput", "CompletionOutput",
           "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from tokenmill.engine.llm import LLM

        return LLM
    if name == "LoRARequest":
        from tokenmill.lora.request import LoRARequest

        return LoRARequest
    if name in ("RequestOutput", "CompletionOutput"):
        from tokenmill import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
