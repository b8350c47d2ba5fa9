"""The C sampler kernels (gptgen/native/sampler.c): the same answers as PyTorch and brute force, the
same sampled tokens as the PyTorch path for the same random numbers, and a clean fallback without them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gptgen.native import sampler as native
from gptgen.generation.samplers import sample

LIB = native.library()
needs_lib = pytest.mark.skipif(LIB is None, reason=f"native kernels not built: {native.status()['detail']}")


def _rows(seed: int, dtype=torch.float32):
    """Rows of assorted lengths (not multiples of the kernels' vector and block widths), with ties and -inf."""
    g = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(1, 9, (), generator=g))
    vocab = int(torch.randint(1, 3000, (), generator=g))
    x = torch.randn(rows, vocab, generator=g) * 3
    if seed % 3 == 0:
        x = x.round()  # many equal scores
    if seed % 5 == 0:
        x[:, ::7] = float("-inf")
    if seed % 4 == 0:  # rows with a stride: a slice of a wider tensor
        wide = torch.full((rows, vocab + 13), 99.0)
        wide[:, :vocab] = x
        x = wide[:, :vocab]
    return x.to(dtype), g


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_equals_torch(dtype):
    for seed in range(120):
        x, _ = _rows(seed, dtype)
        got = native.argmax(x)
        assert got is not None and torch.equal(got, torch.argmax(x, dim=-1)), seed


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_candidates_are_every_token_at_or_above_the_kth_in_id_order(dtype):
    for seed in range(120):
        x, g = _rows(seed, dtype)
        rows, vocab = x.shape
        k = torch.randint(1, vocab + 1, (rows,), generator=g)
        got = native.top_candidates(x, k, cap=vocab)
        assert got is not None, seed
        values, ids = got
        assert values.dtype == x.dtype
        for r in range(rows):
            kth = torch.topk(x[r].float(), int(k[r])).values[-1]
            want = torch.nonzero(x[r].float() >= kth)[:, 0]  # brute force, increasing ids
            n = want.numel()
            assert torch.equal(ids[r, :n], want), (seed, r)
            assert torch.equal(values[r, :n], x[r, want]), (seed, r)
            assert bool((values[r, n:] == float("-inf")).all()), (seed, r)
            assert bool(((ids[r] >= 0) & (ids[r] < vocab)).all())


@needs_lib
def test_kernels_decline_nan_rows_and_too_many_ties():
    x = torch.randn(3, 500)
    x[1, 17] = float("nan")
    assert native.argmax(x) is None
    assert native.top_candidates(x, 5, cap=500) is None
    flat = torch.zeros(2, 500)  # every token ties with the 5th: 500 candidates, more than cap
    assert native.top_candidates(flat, 5, cap=64) is None
    got = native.top_candidates(flat, 5, cap=500)
    assert got is not None and got[1].shape == (2, 500)


def _sample_both(monkeypatch, scores, seed, **options):
    fast = sample(scores, torch.Generator().manual_seed(seed), **options)
    with monkeypatch.context() as m:
        m.setattr(native, "library", lambda: None)
        slow = sample(scores, torch.Generator().manual_seed(seed), **options)
    return fast, slow


@needs_lib
@pytest.mark.parametrize("bf16_values", [False, True])
def test_sample_draws_the_same_tokens_with_and_without_the_kernels(monkeypatch, bf16_values):
    """Top-k (per row too) with top-p and temperature at GPT-2's vocabulary: the kernel path's candidates
    meet the draw in the same order, so the same random numbers give the same tokens."""
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        scores = torch.randn(6, 50257, generator=g) * 4
        if bf16_values:
            scores = scores.bfloat16().float()  # ties at the k-th are common
        options = [dict(top_k=50, top_p=0.95), dict(top_k=40, temperature=0.7),
                   dict(top_k=[1, 5, 50, 200, 7, 3], top_p=0.9, temperature=1.3),
                   dict(top_k=20, temperature=[0.0, 1.0, 0.5, 0.0, 2.0, 1.0])][trial % 4]
        fast, slow = _sample_both(monkeypatch, scores, trial, **options)
        assert torch.equal(fast, slow), (trial, options)


@needs_lib
def test_greedy_generation_is_unchanged_without_the_kernels(monkeypatch):
    from gptgen.config import GPTConfig
    from gptgen.generation import generate_ids
    from gptgen.model import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=2048, n_positions=64, n_layer=2, n_embd=32, n_head=2)).eval()
    prompts = [[5, 6, 7], [100, 3, 9]]
    with_kernels = generate_ids(model, prompts, max_new_tokens=12, eos_token_id=[])
    sampled = generate_ids(model, prompts, max_new_tokens=12, eos_token_id=[], do_sample=True, top_k=30, seed=3)
    monkeypatch.setattr(native, "library", lambda: None)
    assert generate_ids(model, prompts, max_new_tokens=12, eos_token_id=[]) == with_kernels
    assert generate_ids(model, prompts, max_new_tokens=12, eos_token_id=[], do_sample=True, top_k=30,
                        seed=3) == sampled


@pytest.mark.parametrize("env, state", [({"GPTGEN_NATIVE": "0"}, "off"), ({"CC": "false", "PATH": ""}, "unavailable")])
def test_without_kernels_sampling_still_works(tmp_path, env, state):
    """GPTGEN_NATIVE=0, or no compiler to build them: status says why and the PyTorch path answers."""
    code = (
        "import torch\n"
        "from gptgen.native import sampler as native\n"
        "from gptgen.generation.samplers import sample\n"
        "assert native.library() is None\n"
        "print(native.status()['state'])\n"
        "x = torch.randn(4, 5000)\n"
        "assert torch.equal(sample(x, temperature=0.0), x.argmax(-1))\n"
        "t = sample(x, torch.Generator().manual_seed(0), top_k=10)\n"
        "assert all(int(t[r]) in x[r].topk(10).indices.tolist() for r in range(4))\n"
    )
    import os

    full = {**os.environ, "GPTGEN_CACHE_DIR": str(tmp_path), **env}
    done = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == state


def test_built_library_is_cached_and_reused(tmp_path):
    """A second process loads the library the first one built, without compiling it again; another compiler
    builds its own (the compiler and its flags are part of the cache key)."""
    if LIB is None:
        pytest.skip(f"native kernels not built: {native.status()['detail']}")
    import os
    import shutil

    real = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
    log = tmp_path / "calls.log"
    wrappers = []
    for name in ("cc-a", "cc-b"):  # compilers that log each call, then compile with the real one
        w = tmp_path / name
        w.write_text(f'#!/bin/sh\necho "$0" >> {log}\nexec {real} "$@"\n')
        w.chmod(0o755)
        wrappers.append(w)
    code = "from gptgen.native import sampler as native\nassert native.library() is not None\nprint(native.status()['detail'])\n"
    env = {**os.environ, "GPTGEN_CACHE_DIR": str(tmp_path / "cache"), "CC": str(wrappers[0])}

    def run():
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip()

    first = run()
    built = sorted((tmp_path / "cache" / "native").glob("kernels-*.so"))
    assert len(built) == 1 and first == str(built[0])
    stamp = built[0].stat().st_mtime_ns
    calls = log.read_text().splitlines()  # one compile, or more where a first command is refused (-mcpu=native)
    assert calls and set(calls) == {str(wrappers[0])}
    assert run() == first  # the cached file, not compiled again
    assert built[0].stat().st_mtime_ns == stamp and log.read_text().splitlines() == calls
    env["CC"] = str(wrappers[1])
    other = run()
    later = log.read_text().splitlines()[len(calls):]
    assert other != first and later and set(later) == {str(wrappers[1])}
    names = sorted(p.name for p in (tmp_path / "cache" / "native").iterdir())
    assert len(names) == 2 and all(n.startswith("kernels-") and n.endswith(".so") for n in names)