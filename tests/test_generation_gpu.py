"""The CUDA path: the decode step compiled with torch.compile(mode="reduce-overhead") (CUDA graphs)."""

from __future__ import annotations

import pytest
import torch

from gptgen import GPT, GPTConfig
from gptgen.generation import generate_ids

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3, 4]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4, init_std=0.2, eos_token_id=7)
    return GPT(cfg).eval().to("cuda")


@pytest.mark.parametrize("options", [
    dict(),
    dict(num_beams=3, num_return_sequences=2),
    dict(no_repeat_ngram_size=2, repetition_penalty=1.2),
    dict(do_sample=True, top_k=50, top_p=0.95, seed=3, num_return_sequences=2),
])
def test_compiled_step_gives_the_eager_tokens(model, options):
    eager = generate_ids(model, PROMPTS, max_new_tokens=24, compile=False, **options)
    compiled = generate_ids(model, PROMPTS, max_new_tokens=24, compile=True, **options)
    assert compiled == eager


def test_cuda_greedy_matches_cpu(model):
    cpu = GPT(model.config).eval()
    cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    assert generate_ids(model, PROMPTS, max_new_tokens=16) == generate_ids(cpu, PROMPTS, max_new_tokens=16)


def test_bf16_second_call_reuses_the_compiled_step(model):
    from torch._dynamo.utils import counters

    bf16 = GPT(model.config).eval().to("cuda", torch.bfloat16)
    bf16.load_state_dict(model.state_dict())
    first = generate_ids(bf16, PROMPTS, max_new_tokens=32, do_sample=True, top_k=20, seed=1)
    graphs = counters["stats"]["unique_graphs"]
    second = generate_ids(bf16, PROMPTS, max_new_tokens=32, do_sample=True, top_k=20, seed=1)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation
    assert first == second and all(len(s) <= 32 for s in first)
