"""Trainer, metrics, schedules and callbacks, checked against hand-written references."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from gptgen import GPT, LanguageModel, Tokenizer, TokenizerError, TrainingError, preset
from gptgen.data import pack_examples
from gptgen.training import (Callback, EarlyStopping, SampleText, Trainer, evaluate, fit, linear_cross_entropy,
                             lr_multiplier, masked_cross_entropy)

TINY = dict(n_layer=1, n_embd=32, n_head=2, n_inner=64, n_positions=32, vocab_size=128)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"the {w} sat on the {v} and it was {u}" for w in ("cat", "dog", "bird", "fish")
             for v in ("mat", "log", "tree", "rock") for u in ("good", "bad", "odd")]
    return Tokenizer.train("wordpiece", texts, 120, lowercase=True, min_frequency=1,
                           reserved_tokens=["[PAD]", "[UNK]", "[BOS]"])


def tiny_lm(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    lm = LanguageModel.from_preset("mini", tokenizer, **{**TINY, **overrides})
    lm.config.extra["add_bos"] = True
    return lm


def random_packed(n, seq_len, vocab, seed=0, bos=2):
    """Examples of random lengths (so padding and the loss mask matter)."""
    g = torch.Generator().manual_seed(seed)
    lists = [torch.randint(3, vocab, (int(torch.randint(3, seq_len + 4, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n)]
    return pack_examples(lists, seq_len, bos_id=bos, pad_id=0)


# Metrics -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_linear_cross_entropy_matches_autograd_reference(bias):
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, 50, (37,))
    loss, correct = linear_cross_entropy(h, w, b, t, chunk_rows=8)  # 5 chunks, the last one partial
    (loss * 0.7).backward()
    got = [h.grad.clone(), w.grad.clone()] + ([b.grad.clone()] if bias else [])
    for p in (h, w, b):
        if p is not None:
            p.grad = None
    logits = F.linear(h, w, b)
    ref = F.cross_entropy(logits, t, reduction="sum")
    (ref * 0.7).backward()
    want = [h.grad, w.grad] + ([b.grad] if bias else [])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert int(correct) == int((logits.argmax(-1) == t).sum())
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bias, budget_rows", [(True, 16), (False, 16), (False, 12), (True, 200)])
def test_linear_cross_entropy_in_bf16_groups_matches_autograd(monkeypatch, bias, budget_rows):
    """Under bf16 autocast the head's weight gradient is one product per group of chunks: with a budget of
    16 rows (3 groups of 2 chunks, the last partial), of 12 (not a whole number of 8-row chunks: groups of
    one chunk) and of 200 (one group) it equals autograd through a bf16 head."""
    from gptgen.training import metrics

    monkeypatch.setattr(metrics, "_GROUP_BYTES", budget_rows * 2 * 50)
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True) if bias else None
    t = torch.randint(0, 50, (37,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, correct = linear_cross_entropy(h, w, b, t, chunk_rows=8)
    loss.backward()
    got = [h.grad.clone(), w.grad.clone()] + ([b.grad.clone()] if bias else [])
    for p in (h, w, b):
        if p is not None:
            p.grad = None
    logits = F.linear(h.bfloat16(), w.bfloat16(), None if b is None else b.bfloat16()).float()
    ref = F.cross_entropy(logits, t, reduction="sum")
    ref.backward()
    want = [h.grad, w.grad] + ([b.grad] if bias else [])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2)


def test_masked_cross_entropy_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    per_token = [F.cross_entropy(logits[i, j][None], labels[i, j][None]).item()
                 for i in range(2) for j in range(5) if mask[i, j]]
    assert masked_cross_entropy(logits, labels, mask).item() == pytest.approx(sum(per_token) / 8, rel=1e-6)
    garbage = labels.clone()
    garbage[0, 3:] = 7  # labels under the mask do not matter
    assert masked_cross_entropy(logits, garbage, mask).item() == pytest.approx(sum(per_token) / 8, rel=1e-6)


def test_evaluate_is_token_weighted_over_all_batches(tokenizer):
    lm = tiny_lm(tokenizer)
    data = random_packed(10, 32, lm.config.vocab_size, seed=3)
    metrics = evaluate(lm, data, batch_size=3)  # batches of unequal token counts
    with torch.no_grad():
        logits = lm.model(data.input_ids)
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data.labels.reshape(-1), reduction="none")
    keep = data.loss_mask.reshape(-1)
    loss = losses[keep].mean().item()
    acc = int((logits.argmax(-1).reshape(-1)[keep] == data.labels.reshape(-1)[keep]).sum()) / int(keep.sum())
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert metrics["tokens"] == int(keep.sum())


# Schedules ------------------------------------------------------------------------------------------
def test_linear_schedule_is_keras_polynomial_decay_to_zero():
    f = lr_multiplier("linear", total_steps=10)
    # keras.optimizers.schedules.PolynomialDecay(1.0, decay_steps=10, end_learning_rate=0.0, power=1)
    assert [f(s) for s in range(11)] == pytest.approx([(1 - s / 10) for s in range(11)])


def test_cosine_schedule_with_warmup():
    f = lr_multiplier("cosine", total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))
    assert lr_multiplier("constant", 5)(4) == 1.0
    with pytest.raises(TrainingError, match="Unknown learning-rate schedule"):
        lr_multiplier("step", 5)


# fit() against a plain reference loop --------------------------------------------------------------
def reference_losses(lm, data, *, steps, batch_size, lr, weight_decay=0.0, clip=None, schedule="constant",
                     eps=1e-8):
    """A nanoGPT-style loop: full logits, masked mean cross-entropy, torch AdamW, LambdaLR."""
    model = lm.model
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, eps=eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(schedule, steps))
    losses = []
    for step in range(steps):
        sl = slice(step * batch_size, (step + 1) * batch_size)
        x, y, m = data.input_ids[sl], data.labels[sl], data.loss_mask[sl]
        logits = model(x)
        loss = masked_cross_entropy(logits, y, m)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("options", [
    dict(),  # the seed recipe: Adam (weight decay 0), constant rate
    dict(weight_decay=0.1, grad_clip=0.5, schedule="linear"),
])
def test_fit_matches_reference_loop(tokenizer, options):
    data = random_packed(24, 32, 100, seed=1)
    steps, bs, lr = 6, 4, 3e-3
    ref_lm = tiny_lm(tokenizer)
    want = reference_losses(ref_lm, data, steps=steps, batch_size=bs, lr=lr,
                            weight_decay=options.get("weight_decay", 0.0), clip=options.get("grad_clip"),
                            schedule=options.get("schedule", "constant"))
    lm = tiny_lm(tokenizer)
    result = fit(lm, data, epochs=1, batch_size=bs, lr=lr, shuffle=False, progress=False, **options)
    got = [r["loss"] for r in result.history if r["event"] == "step"]
    assert got == pytest.approx(want, rel=1e-5)
    for (name, p), q in zip(lm.model.named_parameters(), ref_lm.model.parameters()):
        if name.endswith("attn.c_attn.bias"):  # the key bias has a zero gradient: Adam amplifies rounding noise
            p, q = torch.cat([p[:32], p[64:]]), torch.cat([q[:32], q[64:]])
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    if options.get("schedule") == "linear":
        lrs = [r["lr"] for r in result.history if r["event"] == "step"]
        assert lrs == pytest.approx([lr * (1 - s / steps) for s in range(steps)])


def test_gradient_accumulation_equals_one_big_batch(tokenizer):
    data = random_packed(16, 32, 100, seed=2)
    runs = []
    for accum in (1, 4):
        lm = tiny_lm(tokenizer)
        res = fit(lm, data, epochs=2, batch_size=8, grad_accum=accum, lr=3e-3, seed=5, progress=False)
        runs.append([r["loss"] for r in res.history if r["event"] == "step"])
    assert len(runs[0]) == 4
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)


def test_fit_on_texts_trains_and_reports_validation(tokenizer, tmp_path):
    texts = [f"the {w} sat on the {v}" for w in ("cat", "dog", "bird") for v in ("mat", "log", "tree")] * 6
    lm = tiny_lm(tokenizer)
    before = evaluate(lm, texts[:9])["loss"]
    result = lm.fit(texts, val_data=texts[:9], epochs=4, batch_size=8, lr=1e-2, progress=False,
                    output_dir=str(tmp_path / "run"))
    assert result.val["loss"] < before - 1.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "step" for r in records) == result.steps == 4 * 7
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2, 3, 4]
    assert all("val_perplexity" in r for r in records if r["event"] == "epoch")
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reloaded = __import__("gptgen").load(tmp_path / "run" / "best")
    assert evaluate(reloaded, texts[:9])["loss"] == pytest.approx(result.val["loss"], rel=1e-5)


# Exact resume within a process (the kill -9 variant is in test_cli_train.py) ---------------------
class _Crash(Callback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, trainer, logs):
        if trainer.step == self.at:
            raise KeyboardInterrupt  # a crash between checkpoints


def test_resume_after_crash_repeats_the_same_losses(tokenizer, tmp_path):
    data = random_packed(20, 32, 100, seed=4)
    val = random_packed(6, 32, 100, seed=5)
    opts = dict(epochs=3, batch_size=6, lr=3e-3, seed=7, save_every=2, progress=False)
    full = fit(tiny_lm(tokenizer, dropout=0.1), data, val, output_dir=str(tmp_path / "a"), **opts)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_lm(tokenizer, dropout=0.1), data, val, output_dir=str(tmp_path / "b"), callbacks=[_Crash(7)], **opts)
    state = json.loads((tmp_path / "b" / "last" / "training_state.json").read_text())
    assert state["step"] == 6  # the checkpoint of step 6; step 7 is lost with the crash
    resumed = fit(tiny_lm(tokenizer, seed=99, dropout=0.1), data, val, output_dir=str(tmp_path / "b"),
                  resume=True, **opts)
    a = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed")} for r in rs]  # noqa: E731
    assert strip(a) == strip(b)  # every step loss, eval and epoch record, bit for bit
    assert resumed.val == full.val
    before = (tmp_path / "b" / "metrics.jsonl").read_text()
    again = fit(tiny_lm(tokenizer, dropout=0.1), data, val, output_dir=str(tmp_path / "b"), resume=True, **opts)
    assert again.steps == full.steps  # a finished run resumes to nothing
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == before


# Bad input -----------------------------------------------------------------------------------------
def test_seq_len_longer_than_context_is_one_sentence(tokenizer):
    lm = tiny_lm(tokenizer)
    with pytest.raises(TrainingError, match=r"64 tokens long but the model's context holds only 32 positions"):
        fit(lm, random_packed(4, 64, 100), progress=False)


def test_vocabulary_mismatch(tokenizer):
    lm = tiny_lm(tokenizer)
    data = random_packed(4, 16, 100)
    data.input_ids[0, 1] = 130
    with pytest.raises(TrainingError, match="the tokenizer and the model do not match"):
        fit(lm, data, progress=False)
    with pytest.raises(TokenizerError, match="embedding holds only"):
        LanguageModel(GPT(preset("mini", **{**TINY, "vocab_size": 50})), tokenizer)


class _Poison(Callback):
    def on_step_end(self, trainer, logs):
        if trainer.step == 5:
            with torch.no_grad():
                trainer.lm.model.lm_head.bias.fill_(float("nan"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tokenizer, tmp_path):
    lm = tiny_lm(tokenizer)
    with pytest.raises(TrainingError) as info:
        fit(lm, random_packed(40, 32, 100), epochs=1, batch_size=4, save_every=2, output_dir=str(tmp_path),
            callbacks=[_Poison()], progress=False)
    message = str(info.value)
    assert "loss became nan at step 6" in message
    assert "last good checkpoint (step 4)" in message and str(tmp_path / "last") in message
    reloaded = __import__("gptgen").load(tmp_path / "last")
    assert all(torch.isfinite(p).all() for p in reloaded.model.parameters())


def test_existing_run_is_not_overwritten(tokenizer, tmp_path):
    data = random_packed(8, 32, 100)
    fit(tiny_lm(tokenizer), data, batch_size=4, output_dir=str(tmp_path), progress=False)
    with pytest.raises(TrainingError, match="already holds a training run"):
        fit(tiny_lm(tokenizer), data, batch_size=4, output_dir=str(tmp_path), progress=False)


# Callbacks ---------------------------------------------------------------------------------------------
def test_early_stopping_counts_evaluations_without_improvement():
    class FakeTrainer:
        reason = None

        def request_stop(self, reason):
            self.reason = reason

    cb, trainer = EarlyStopping(patience=2), FakeTrainer()
    for loss in (3.0, 2.5, 2.6, 2.4, 2.45):
        cb.on_evaluate(trainer, {"loss": loss})
        assert trainer.reason is None
    cb.on_evaluate(trainer, {"loss": 2.41})
    assert "has not improved for 2" in trainer.reason
    restored = EarlyStopping(patience=2)
    restored.load_state_dict(cb.state_dict())
    assert (restored.best, restored.bad_evals) == (2.4, 2)


def test_early_stopping_ends_fit(tokenizer):
    data = random_packed(12, 32, 100, seed=8)
    val = random_packed(4, 32, 100, seed=9)  # random tokens: validation loss soon rises
    res = fit(tiny_lm(tokenizer), data, val, epochs=30, batch_size=4, lr=3e-2, early_stopping=1, progress=False)
    assert res.stopped and "early stopping" in res.stopped
    assert res.epochs < 30


def test_sample_callback_degrades_without_generation(tokenizer, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gptgen.generation":
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    cb = SampleText(print_fn=None)
    res = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fit(tiny_lm(tokenizer), random_packed(8, 32, 100), batch_size=4, epochs=2, callbacks=[cb],
                  progress=False)
    assert res.steps == 4 and cb.samples == []
    assert any("Text samples are skipped" in str(w.message) for w in caught)


def test_sample_callback_logs_a_top_k_sample(tokenizer):
    pytest.importorskip("gptgen.generation")
    cb = SampleText(max_new_tokens=5, print_fn=None)
    res = fit(tiny_lm(tokenizer), random_packed(8, 32, 100), batch_size=4, epochs=1, callbacks=[cb], progress=False)
    samples = [r for r in res.history if r["event"] == "sample"]
    if not cb.samples:
        pytest.skip("gptgen.generation is not usable yet")
    assert len(samples) == 1 and samples[0]["sampler"] == "top_k" and isinstance(samples[0]["text"], str)


def test_trainer_rejects_unknown_options(tokenizer):
    with pytest.raises(TrainingError, match="Unknown training option"):
        Trainer(tiny_lm(tokenizer), random_packed(4, 32, 100), learning_rate=1.0)


# CUDA paths --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("precision,compile", [("bf16", False), ("bf16", True), ("fp16", False)])
def test_cuda_mixed_precision_training_tracks_fp32(tokenizer, precision, compile):
    data = random_packed(32, 32, 100, seed=1)
    ref = fit(tiny_lm(tokenizer, n_embd=64, n_head=2), data, epochs=2, batch_size=8, lr=1e-3, device="cuda",
              precision="fp32", progress=False, shuffle=False)
    got = fit(tiny_lm(tokenizer, n_embd=64, n_head=2), data, epochs=2, batch_size=8, lr=1e-3, device="cuda",
              precision=precision, compile=compile, progress=False, shuffle=False)
    a = [r["loss"] for r in ref.history if r["event"] == "step"]
    b = [r["loss"] for r in got.history if r["event"] == "step"]
    assert b == pytest.approx(a, rel=3e-2)
    assert b[-1] < b[0]


@pytest.mark.gpu
def test_cuda_flash_attention_and_fused_adamw(tokenizer):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lm = tiny_lm(tokenizer, n_embd=128, n_head=2, norm_position="pre", activation="gelu_tanh")
    trainer = Trainer(lm, random_packed(16, 32, 100), batch_size=8, device="cuda", precision="bf16", progress=False)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # fails if flash attention cannot run these shapes
        result = trainer.fit()
    assert trainer.optimizer.defaults.get("fused") is True
    assert all(math.isfinite(r["loss"]) for r in result.history if r["event"] == "step")


@pytest.mark.slow
def test_compiled_body_trains_like_eager(tokenizer):
    data = random_packed(12, 32, 100, seed=6)
    runs = []
    for compile in (False, True):
        res = fit(tiny_lm(tokenizer), data, epochs=1, batch_size=4, lr=3e-3, compile=compile, progress=False)
        runs.append([r["loss"] for r in res.history if r["event"] == "step"])
    assert runs[1] == pytest.approx(runs[0], rel=1e-4)


def test_no_png_without_matplotlib_but_a_note(tokenizer, tmp_path, monkeypatch, caplog):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with caplog.at_level("WARNING", logger="gptgen.training"):
        res = fit(tiny_lm(tokenizer), random_packed(8, 32, 100), batch_size=4, epochs=2, output_dir=str(tmp_path),
                  progress=False)
    assert res.curves_path is None and not (tmp_path / "curves.png").exists()
    assert (tmp_path / "metrics.jsonl").is_file()
    notes = [r.getMessage() for r in caplog.records if "matplotlib is not installed" in r.getMessage()]
    assert len(notes) == 1
