"""Text generation: one decode engine over a static KV cache, samplers, logits processors, stopping; every
option once in GenerationConfig (config.py).

    from gptgen.generation import GenerationConfig, generate, stream, TopKSampler
    generate(lm, "Once upon a time", GenerationConfig(max_new_tokens=40, do_sample=True, seed=0))
    generate(lm, "My trip to Yosemite was", max_length=200, sampler="top_k")
    generate(lm, ["a", "b"], max_new_tokens=40, do_sample=True, top_k=50, top_p=0.95, num_return_sequences=3)
    for piece in stream(lm, "Once upon a time", sampler=TopKSampler(k=10)): print(piece, end="")
"""

from .batcher import BatchEngine, Completion, PromptTooLong, QueueFull, SamplingParams, TokenEvent
from .config import DEFAULT_MAX_NEW_TOKENS, GenerationConfig
from .engine import decode_steps, generate, generate_ids, resolve_sampler, stream
from .processors import (BadWords, LogitsProcessor, MinNewTokens, NoRepeatNGram, PresenceFrequencyPenalty,
                         RepetitionPenalty)
from .samplers import (SAMPLERS, BeamSampler, ContrastiveSampler, GreedySampler, RandomSampler, Sampler,
                       TopKSampler, TopPSampler, apply_temperature, draw, epsilon_filter, eta_filter, get_sampler,
                       min_p_filter, sample, top_k_filter, top_p_filter, typical_filter, warp)

__all__ = [
    "GenerationConfig", "generate", "stream", "generate_ids", "resolve_sampler", "decode_steps", "DEFAULT_MAX_NEW_TOKENS",
    "Sampler", "GreedySampler", "BeamSampler", "RandomSampler", "TopKSampler", "TopPSampler",
    "ContrastiveSampler", "SAMPLERS", "get_sampler",
    "LogitsProcessor", "RepetitionPenalty", "NoRepeatNGram", "BadWords", "MinNewTokens", "PresenceFrequencyPenalty",
    "apply_temperature", "top_k_filter", "top_p_filter", "min_p_filter", "typical_filter", "epsilon_filter",
    "eta_filter", "warp", "draw", "sample",
    "BatchEngine", "SamplingParams", "TokenEvent", "Completion", "QueueFull", "PromptTooLong",
]
