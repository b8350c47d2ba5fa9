"""Training throughput of gptgen's Trainer against a plain nanoGPT-style loop, measured in the same run.

For each shape (the `mini` preset and GPT-2 124M) both sides train the same model size with the same
batch, sequence length and precision on random tokens; the script prints tokens/s (input tokens per
second of optimizer steps, warm-up steps excluded), the ratio gptgen / reference, and on CUDA the model
FLOPs utilisation (nanoGPT's 6N + 12·L·T·C FLOPs per token against the GPU's dense bf16 peak, or on CPU
against a matmul peak measured in the run in the same precision).

    python bench/bench_train.py                       # CPU: small batches, a few steps each
    python bench/bench_train.py --shapes mini --steps 20 --batch-size 64 --seq-len 128
    python bench/bench_train.py --device cuda --compile   # bf16 autocast, fused AdamW, flash SDPA
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptgen import GPT, LanguageModel, Tokenizer, preset
from gptgen.data import PackedExamples
from gptgen.training import Trainer

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


# The reference: a nanoGPT-style model and loop --------------------------------------------------
class RefAttention(nn.Module):
    def __init__(self, c, n_head, head_dim):
        super().__init__()
        self.n_head, self.head_dim = n_head, head_dim
        self.qkv = nn.Linear(c, 3 * n_head * head_dim)
        self.proj = nn.Linear(n_head * head_dim, c)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.n_head * self.head_dim, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class RefBlock(nn.Module):
    def __init__(self, c, n_head, head_dim, ffn, act):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.attn = RefAttention(c, n_head, head_dim)
        self.mlp = nn.Sequential(nn.Linear(c, ffn), act, nn.Linear(ffn, c))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class RefGPT(nn.Module):
    """nanoGPT's shape of model, sized like a gptgen config (same layers, widths, vocabulary, head)."""

    def __init__(self, cfg):
        super().__init__()
        act = nn.ReLU() if cfg.activation == "relu" else nn.GELU(approximate="tanh")
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.blocks = nn.ModuleList(RefBlock(cfg.n_embd, cfg.n_head, cfg.attn_head_dim, cfg.ffn_dim, act)
                                    for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd) if cfg.final_norm else nn.Identity()
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_word_embeddings:
            self.head.weight = self.wte.weight

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def reference_tokens_per_s(cfg, data, args, device, dtype):
    torch.manual_seed(0)
    model = RefGPT(cfg).to(device)
    step_fn = torch.compile(model) if args.compile else model
    extra = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, **extra)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)
    times = []
    B = args.batch_size
    for step in range(args.warmup + args.steps):
        x = data.input_ids[step * B % len(data):][:B].to(device, non_blocking=True)
        y = torch.where(data.loss_mask, data.labels, -1)[step * B % len(data):][:B].to(device, non_blocking=True)
        _sync(device)
        t0 = time.perf_counter()
        with ctx:
            loss = step_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    return B * data.input_ids.shape[1] / statistics.median(times)


def gptgen_tokens_per_s(cfg, data, args, device):
    torch.manual_seed(0)
    tok = Tokenizer.train("wordpiece", ["a b c"], 10, min_frequency=1)  # ids only; the data is random
    lm = LanguageModel(GPT(cfg), tok)
    trainer = Trainer(lm, data, batch_size=args.batch_size, max_steps=args.warmup + args.steps, lr=1e-4,
                      grad_clip=1.0, device=str(device), precision=args.precision, compile=args.compile,
                      progress=False, shuffle=False)
    result = trainer.fit()
    rates = [r["tokens_per_s"] for r in result.history if r["event"] == "step"][args.warmup:]
    return statistics.median(rates), lm.num_parameters()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_data(cfg, n, seq_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(3, cfg.vocab_size, (n, seq_len + 1), generator=g)
    return PackedExamples(seq[:, :-1].contiguous(), seq[:, 1:].contiguous(), torch.ones(n, seq_len, dtype=torch.bool))


def measured_matmul_peak(dtype, threads, n=2048, repeats=10):
    """FLOP/s of an n x n x n matmul in dtype on this CPU (the best of a few): the peak MFU is taken against."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def mfu(cfg, n_params, seq_len, tokens_per_s, device, cpu_peak=None):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    else:
        peak = cpu_peak
    if peak is None:
        return None
    non_embedding = n_params - cfg.vocab_size * cfg.n_embd * (0 if cfg.tie_word_embeddings else 1) \
        - cfg.n_positions * cfg.n_embd
    flops_per_token = 6 * non_embedding + 12 * cfg.n_layer * seq_len * cfg.attn_inner_dim
    return flops_per_token * tokens_per_s / peak


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["mini", "gpt2"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--steps", type=int, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="alternating measurements per side (best is kept)")
    p.add_argument("--precision", default=None, help="fp32 or bf16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": None}[args.precision]
    cuda = device.type == "cuda"
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else f'{args.threads} CPU threads'}), "
          f"precision {args.precision}, compile {args.compile}, torch {torch.__version__}")
    cpu_peak = None
    if not cuda:
        cpu_peak = measured_matmul_peak(dtype or torch.float32, args.threads)
        print(f"measured {args.precision} matmul peak (2048^3): {cpu_peak / 1e9:,.0f} GFLOP/s; MFU below is against it")
    print(f"{'shape':<6} {'params':>12} {'batch x seq':>12} {'gptgen tok/s':>13} {'reference tok/s':>16} "
          f"{'ratio':>6} {'MFU':>6}")
    for shape in args.shapes:
        cfg = preset(shape)
        defaults = {"mini": (64 if cuda else 16, 128, 20 if cuda else 4),
                    "gpt2": (16 if cuda else 2, 1024 if cuda else 64, 20 if cuda else 2)}.get(shape, (8, 128, 4))
        bs = args.batch_size or defaults[0]
        seq_len = min(args.seq_len or defaults[1], cfg.n_positions)
        steps = args.steps or defaults[2]
        run = argparse.Namespace(**{**vars(args), "batch_size": bs, "steps": steps})
        data = random_data(cfg, bs * (run.warmup + steps), seq_len)
        ours, ref = 0.0, 0.0
        for _ in range(args.repeats):  # alternate the two sides; keep each one's best (shared machines)
            rate, n_params = gptgen_tokens_per_s(cfg, data, run, device)
            ours = max(ours, rate)
            ref = max(ref, reference_tokens_per_s(cfg, data, run, device, dtype))
        m = mfu(cfg, n_params, seq_len, ours, device, cpu_peak)
        m_ref = mfu(cfg, n_params, seq_len, ref, device, cpu_peak)
        mfu_txt = f"{m:.1%}/{m_ref:.1%}" if m is not None else "-"
        print(f"{shape:<6} {n_params:>12,} {f'{bs} x {seq_len}':>12} {ours:>13,.0f} {ref:>16,.0f} "
              f"{ours / ref:>6.2f} {mfu_txt:>6}", flush=True)
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
