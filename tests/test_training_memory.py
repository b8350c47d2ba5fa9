"""Training past one device's memory: activation checkpointing, the memory estimate, FSDP2 (torchrun, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptgen import LanguageModel, Tokenizer
from gptgen.training import fit
from gptgen.data import pack_examples

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(n_layer=2, n_embd=32, n_head=2, n_inner=64, n_positions=32, vocab_size=128)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"the {w} sat on the {v} and it was {u}" for w in ("cat", "dog", "bird", "fish")
             for v in ("mat", "log", "tree", "rock") for u in ("good", "bad", "odd")]
    return Tokenizer.train("wordpiece", texts, 120, lowercase=True, min_frequency=1,
                           reserved_tokens=["[PAD]", "[UNK]", "[BOS]"])


def tiny_lm(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    return LanguageModel.from_preset("gpt2", tokenizer, **{**TINY, **overrides})


def random_packed(n, seq_len, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    lists = [torch.randint(3, vocab, (int(torch.randint(4, seq_len + 2, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n)]
    return pack_examples(lists, seq_len, bos_id=2, pad_id=0)


def _run(tokenizer, data, **options):
    lm = tiny_lm(tokenizer, dropout=options.pop("dropout", 0.0))
    result = fit(lm, data, batch_size=8, max_steps=6, lr=3e-3, precision="fp32", device="cpu", progress=False,
                 seed=1, **options)
    return [r["loss"] for r in result.history if r["event"] == "step"], lm.model.state_dict()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_bit_equal_training(tokenizer, dropout, lora):
    data = random_packed(48, 24, 120)
    extra = dict(lora_rank=4) if lora else {}
    plain, plain_state = _run(tokenizer, data, dropout=dropout, **extra)
    ckpt, ckpt_state = _run(tokenizer, data, dropout=dropout, gradient_checkpointing=True, **extra)
    # The same kernels on the same inputs in the same order (the recomputation restores the dropout RNG):
    # bit-equal losses and weights on CPU fp32.
    assert ckpt == plain
    assert plain_state.keys() == ckpt_state.keys()
    assert all(torch.equal(plain_state[k], ckpt_state[k]) for k in plain_state)


def test_gradient_checkpointing_recomputes_blocks(tokenizer, monkeypatch):
    """The switch really checkpoints: each block's forward runs twice per training step (once again in backward)."""
    from gptgen import model as model_module

    data = random_packed(16, 24, 120)
    calls = []
    forward = model_module.Block.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(model_module.Block, "forward", counted)
    lm = tiny_lm(tokenizer)
    fit(lm, data, batch_size=8, max_steps=1, precision="fp32", device="cpu", progress=False, eval_each_epoch=False,
        gradient_checkpointing=True)
    assert len(calls) == 2 * TINY["n_layer"]
    calls.clear()
    fit(lm, data, batch_size=8, max_steps=1, precision="fp32", device="cpu", progress=False, eval_each_epoch=False)
    assert len(calls) == TINY["n_layer"]


# FSDP2 under torchrun (CPU, gloo) ------------------------------------------------------------------------
WORKER = Path(__file__).with_name("fsdp_worker.py")


def _torchrun(out, options, kill_at=None, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_at:
        env["KILL_AT_STEP"] = str(kill_at)
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
           str(WORKER), str(out), json.dumps(options)]
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), json.dumps(options)]
    # A session of its own: the kill -9 test kills the worker's whole process group.
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, start_new_session=True)


def _losses(out):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if json.loads(line)["event"] == "step"]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    single = _torchrun(base / "single", {"save_every": 5}, nproc=1)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = _torchrun(base / "fsdp", {"fsdp": True, "save_every": 5})
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    return base


def test_fsdp_two_processes_match_one_process(fsdp_runs):
    one, two = _losses(fsdp_runs / "single"), _losses(fsdp_runs / "fsdp")
    assert len(one) == len(two) == 20
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5  # fp32: only the reduction order differs
    # The checkpoint is a normal model directory: it loads in one process, with the trained weights.
    from gptgen import load

    loaded = load(fsdp_runs / "fsdp" / "last").model.state_dict()
    trained = torch.load(fsdp_runs / "fsdp.final.pt")
    reference = torch.load(fsdp_runs / "single.final.pt")
    for name, tensor in reference.items():
        assert torch.equal(loaded[name], trained[name])
        torch.testing.assert_close(loaded[name], tensor, atol=1e-4, rtol=0)
    # The optimizer state is stored as one process stores it (index keys, full tensors).
    a = torch.load(fsdp_runs / "fsdp" / "last" / "training_state.pt")["optimizer"]
    b = torch.load(fsdp_runs / "single" / "last" / "training_state.pt")["optimizer"]
    assert a["state"].keys() == b["state"].keys()
    for i in b["state"]:
        torch.testing.assert_close(a["state"][i]["exp_avg_sq"], b["state"][i]["exp_avg_sq"], atol=1e-6, rtol=1e-3)


@pytest.mark.slow
def test_fsdp_resumes_exactly_after_kill_9(fsdp_runs, tmp_path):
    killed = _torchrun(tmp_path / "run", {"fsdp": True, "save_every": 5}, kill_at=12)
    assert killed.returncode != 0
    assert json.loads((tmp_path / "run" / "last" / "training_state.json").read_text())["step"] == 10
    resumed = _torchrun(tmp_path / "run", {"fsdp": True, "save_every": 5, "resume": True})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(tmp_path / "run") == _losses(fsdp_runs / "fsdp")  # bit-equal to the uninterrupted run


def test_fsdp_needs_torchrun(tokenizer):
    from gptgen.errors import TrainingError

    with pytest.raises(TrainingError, match="torchrun"):
        _run(tokenizer, random_packed(16, 24, 120), fsdp=True)


# The memory estimate ------------------------------------------------------------------------------------
def _saved_activation_bytes(config, batch, length, checkpointing):
    """Bytes of the tensors autograd keeps for the backward pass of one loss computation (weights excluded)."""
    from gptgen import GPT
    from gptgen.training.loss import LossModule

    torch.manual_seed(0)
    model = GPT(config).train()
    model.gradient_checkpointing = checkpointing
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (batch, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        LossModule(model)(ids, ids, torch.ones(batch, length, dtype=torch.bool))
    return sum(kept.values())


def test_memory_estimate_counts_and_activations():
    from gptgen import GPT, preset
    from gptgen.training.memory import estimate_memory, memory_table

    full = estimate_memory("gpt2", "full", batch_size=8, seq_len=128)
    with torch.device("meta"):
        assert full.parameters == GPT(preset("gpt2")).num_parameters() == 124_439_808
    assert full.weights + full.gradients + full.optimizer == 16 * full.parameters  # fp32 weights, grads, 2 moments
    lora = estimate_memory("gpt2", "lora", batch_size=8, seq_len=128)
    assert lora.trainable == 12 * 8 * (3072 + 1536 + 2 * 3840) and lora.weights == full.weights
    assert lora.gradients == 4 * lora.trainable and lora.total < full.total / 2
    ckpt = estimate_memory("gpt2", "lora", batch_size=8, seq_len=128, gradient_checkpointing=True)
    assert ckpt.activations < lora.activations / 3
    xl = [estimate_memory("gpt2-xl", "fsdp", devices=n, batch_size=8, seq_len=1024) for n in (1, 2, 8)]
    assert xl[0].total > xl[1].total > xl[2].total
    assert xl[2].optimizer == 8 * xl[2].parameters // 8
    assert "gpt2-xl" in memory_table()
    # Activations: the estimate against what autograd really keeps, on a GPT-2-shaped model.
    cfg = preset("gpt2", n_layer=4, n_embd=128, n_head=4, n_positions=64, vocab_size=500)
    est = estimate_memory(cfg, "full", batch_size=4, seq_len=64).activations
    assert 0.8 < est / _saved_activation_bytes(cfg, 4, 64, False) < 1.25
    # With checkpointing the forward keeps block inputs; the estimate adds the one block rebuilt in backward.
    est = estimate_memory(cfg, "full", batch_size=4, seq_len=64, gradient_checkpointing=True).activations
    one_block = 4 * 4 * 64 * 16 * 128
    assert 0.8 < (est - one_block) / _saved_activation_bytes(cfg, 4, 64, True) < 1.25
