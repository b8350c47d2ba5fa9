"""The runner (gptgen.generation.runner): one KV cache with a position per row, backends chosen in one place.

Oracle: GPT.forward over each whole sequence without a cache (model.py, the one definition of the model).
Every backend's one-token steps, at per-row positions or over left-padded rows, give its logits."""

from __future__ import annotations

import pytest
import torch

import gptgen.native
from gptgen.config import GPTConfig
from gptgen.errors import GenerationError
from gptgen.generation.runner import Runner, select_backend
from gptgen.model import GPT

SEQS = [[5, 6, 7, 8, 9, 10, 11], [14, 15, 16, 17, 19], [12, 13, 18]]


def tiny(style="gpt2", seed=0) -> GPT:
    torch.manual_seed(seed)
    extra = {} if style == "gpt2" else dict(norm_position="post", activation="relu", tie_word_embeddings=False,
                                            lm_head_bias=True, final_norm=False)
    model = GPT(GPTConfig(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, **extra)).eval()
    with torch.no_grad():  # biases that are not zero, so a missed bias shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.3)
    return model


def reference(model, seq):
    """Logits after each token of seq, from the whole sequence at once (no cache)."""
    with torch.no_grad():
        return model(torch.tensor([seq]))[0].float()


def native_runs() -> bool:
    return gptgen.native.decoder(tiny()) is not None


def backends():
    out = ["eager"]
    if native_runs():
        out.append("native")
    return out


def make(model, backend, rows, max_len, private=False):
    with pytest.MonkeyPatch.context() as m:
        if backend == "eager":
            m.setattr(gptgen.native, "decoder", lambda model: None)
        runner = Runner(model, rows, max_len, private=private)
    assert runner.backend == backend
    return runner


@pytest.mark.parametrize("style", ["gpt2", "keras"])
@pytest.mark.parametrize("backend", backends())
def test_rows_at_their_own_positions_give_the_whole_sequence_logits(style, backend):
    """Prefill of rows in any cache rows (a gather, `last` picks each row's last real token), then one-token
    steps of rows 0..B-1 at different positions: each step's logits are the full forward's at that token."""
    model = tiny(style)
    runner = make(model, backend, rows=4, max_len=24, private=True)
    prompts = [s[:2] for s in SEQS]
    with torch.inference_mode():
        T = max(len(p) for p in prompts)
        idx = torch.zeros(3, T, dtype=torch.long)
        pos = torch.zeros(3, T, dtype=torch.long)
        for i, p in enumerate(prompts):
            idx[i, :len(p)] = torch.tensor(p)
            pos[i] = torch.arange(T)
        logits = runner.forward(idx, pos, rows=torch.tensor([0, 1, 2]), last=torch.tensor([len(p) - 1 for p in prompts]))
        for i, p in enumerate(prompts):
            torch.testing.assert_close(logits[i], reference(model, SEQS[i])[len(p) - 1], atol=1e-4, rtol=1e-4)
        # then decode the rest of each sequence one token a step; the shorter rows (the last ones) stop early
        lens, steps = [len(p) for p in prompts], 0
        for _ in range(5):
            live = [i for i in range(3) if lens[i] < len(SEQS[i])]
            if live != list(range(len(live))):
                break
            idx = torch.tensor([[SEQS[i][lens[i]]] for i in live])
            pos = torch.tensor([[lens[i]] for i in live])
            logits = runner.forward(idx, pos)
            for k, i in enumerate(live):
                torch.testing.assert_close(logits[k], reference(model, SEQS[i])[lens[i]], atol=1e-4, rtol=1e-4)
                lens[i] += 1
            steps += 1
    assert steps == 5 and lens == [7, 5, 3]
    runner.close()


@pytest.mark.parametrize("backend", backends())
def test_left_padded_rows_and_row_copies_give_the_whole_sequence_logits(backend):
    """The per-call engine's layout: prompts left-padded to one length, positions counting real tokens only;
    copy_rows (a beam reorder) moves a row's cache and padding with it."""
    model = tiny()
    prompts = [s[:4] for s in SEQS]
    lens = [len(p) for p in prompts]
    P = max(lens)
    runner = make(model, backend, rows=3, max_len=P + 3)
    with torch.inference_mode():
        idx = torch.zeros(3, P, dtype=torch.long)
        key = torch.zeros(3, P, dtype=torch.long)
        for i, p in enumerate(prompts):
            idx[i, P - len(p):] = torch.tensor(p)
            key[i, P - len(p):] = 1
        runner.start_padded(key, torch.tensor([P - n for n in lens]))
        logits, _ = runner.forward_padded(idx, 0, prefill=True)
        for i, n in enumerate(lens):
            torch.testing.assert_close(logits[i], reference(model, SEQS[i])[n - 1], atol=1e-4, rtol=1e-4)
        order = torch.tensor([2, 0, 0])  # rows now hold prompts 2, 0, 0
        runner.copy_rows(order)
        seqs = [SEQS[2][:4] + [40], SEQS[0][:4] + [41], SEQS[0][:4] + [42]]
        logits, hidden = runner.forward_padded(torch.tensor([[40], [41], [42]]), P, hidden=True)
        assert hidden is not None and hidden.shape[0] == 3
        for i, seq in enumerate(seqs):
            torch.testing.assert_close(logits[i], reference(model, seq)[-1], atol=1e-4, rtol=1e-4)
    runner.close()
    assert model.kv_caches() == []  # the per-call runner leaves no cache on the model


def test_move_and_swap_rows_move_the_cache():
    model = tiny()
    runner = make(model, "eager", rows=3, max_len=16, private=True)
    with torch.inference_mode():
        for row, seq in ((0, SEQS[0][:3]), (2, SEQS[1][:3])):
            runner.forward(torch.tensor([seq]), torch.arange(3)[None], rows=torch.tensor([row]), last=torch.tensor([2]))
        runner.swap_rows(0, 2, 3)   # row 0 holds sequence 1 now, row 2 sequence 0
        runner.move_row(2, 1, 3)    # and row 1 a copy of sequence 0
        logits = runner.forward(torch.tensor([[SEQS[1][3]], [SEQS[0][3]]]), torch.tensor([[3], [3]]))
    torch.testing.assert_close(logits[0], reference(model, SEQS[1])[3], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], reference(model, SEQS[0])[3], atol=1e-4, rtol=1e-4)
    assert model.kv_caches() == []  # a private runner's cache is on its copy of the modules


def test_the_backend_is_chosen_in_one_place(monkeypatch):
    model = tiny()
    with pytest.raises(GenerationError, match="compile must be True, False or None"):
        select_backend(model, "yes")
    for compile in (None, False, True):  # the native step whatever `compile` says: it compiles nothing
        name, step = select_backend(model, compile)
        assert name == ("native" if native_runs() else "compiled" if compile else "eager")
        assert (step is not None) == (name == "native")
    monkeypatch.setattr(gptgen.native, "decoder", lambda model: None)
    assert select_backend(model, None) == ("eager", None) and select_backend(model, False) == ("eager", None)
    assert select_backend(model, True) == ("compiled", None)
    model.to(torch.bfloat16)
    assert select_backend(model, None)[0] == "eager"


def test_the_cuda_graph_steps_run_eagerly_give_the_whole_sequence_logits(monkeypatch):
    """The CUDA-graph step bodies (fixed shapes: left-padded rows over the whole cache; per-row positions padded
    to a power-of-two bucket) run eagerly on CPU, torch.compile replaced by a pass-through."""
    from gptgen.generation import runner as runner_module

    compiled = []

    def eager(fn, **options):
        assert options["mode"] == "reduce-overhead" and options["fullgraph"]
        compiled.append(options.get("dynamic"))
        return fn

    monkeypatch.setattr(runner_module.torch, "compile", eager)
    model = tiny()
    prompts = [s[:2] for s in SEQS]
    with torch.inference_mode():
        padded = make(model, "eager", rows=3, max_len=8)
        padded.graphs = True
        padded.start_padded(torch.ones(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long))
        padded.forward_padded(torch.tensor(prompts), 0, prefill=True)
        logits, _ = padded.forward_padded(torch.tensor([[s[2]] for s in SEQS]), 2)
        for i, seq in enumerate(SEQS):
            torch.testing.assert_close(logits[i], reference(model, seq)[2], atol=1e-4, rtol=1e-4)
        padded.close()
        rows = make(model, "eager", rows=4, max_len=16, private=True)
        rows.graphs = True
        rows.forward(torch.tensor(prompts), torch.arange(2).expand(3, 2), rows=torch.arange(3), last=torch.ones(3, dtype=torch.long))
        logits = rows.forward(torch.tensor([[s[2]] for s in SEQS]), torch.full((3, 1), 2))  # 3 rows: a bucket of 4
        for i, seq in enumerate(SEQS):
            torch.testing.assert_close(logits[i], reference(model, seq)[2], atol=1e-4, rtol=1e-4)
    assert compiled == [None, False]
