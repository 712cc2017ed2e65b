"""Sampling: logits processors, the batched sampler, and the speculative rejection sampler."""
from tokenmill.sample.rejection import rejection_sample
from tokenmill.sample.sampler import Sampler, SamplerOutput, SamplingBatch, make_request_generator

__all__ = ["Sampler", "SamplerOutput", "SamplingBatch", "make_request_generator", "rejection_sample"]
