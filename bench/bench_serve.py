"""Serving benchmark: offered concurrency 1, 8, 32, 128 against `gptgen serve` and its peers, measured in
the same run on the same weights.

    PYTHONPATH=src python bench/bench_serve.py                      # 6-layer 384-wide GPT-2 shape, random weights
    PYTHONPATH=src python bench/bench_serve.py --levels 1,8,32 --max-tokens 32 --requests 1

Servers (each a subprocess on a loopback port, streaming over the OpenAI API):
  gptgen        `gptgen serve --max-batch 32`: continuous batching
  naive         `gptgen serve --max-batch 1`: the same app answering one request at a time
  gptgen-compiled  `gptgen serve --max-batch 32 --compile`: the CPU decode step compiled by inductor
                (--peers gptgen-compiled; it compiles every batch size before it answers)
  gptgen-int8dyn  `gptgen serve --max-batch 32 --quantize int8-dynamic`: int8 weights and activations, the
                native decode step where the CPU has AVX512-VNNI (--peers gptgen-int8dyn; --gptgen-args
                do not apply to it)
  transformers  `transformers serve` on the model exported to Hugging Face format (--peers transformers;
                transformers-cb adds its --continuous-batching)
  llama.cpp     llama-cpp-python's server on the same weights converted to GGUF (--peers llama.cpp; needs
                `pip install 'llama-cpp-python[server]'` and the `gguf` package)
A peer that cannot start here is skipped with the reason printed.

Per server and concurrency C, C clients each send `--requests` rounds of streaming requests (C * rounds in
all; at least --min-requests), every request asking for --max-tokens tokens (ignore_eos where the server
has it). Printed: aggregate output tokens/s (all completion tokens / wall time), time to first token p50/p99, and per-token
latency p50/p99 (each request's (last token - first token) / (tokens - 1)), then ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = Path(os.environ.get("GPTGEN_DATA_DIR", REPO.parent / "shared" / "data")) / "gpt2-tokenizer"
WORDS = ("river mountain quiet engine garden yellow letter window morning city music paper silver train "
         "forest number winter story ocean bridge market candle thunder village").split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", default=os.environ.get("GPTGEN_BENCH_TOKENIZER", str(DEFAULT_TOKENIZER)),
                   help="GPT-2 tokenizer directory (encoder.json + vocab.bpe) or a trained tokenizer")
    p.add_argument("--model", help="serve this model directory instead of a random 6-layer 384-wide GPT-2")
    p.add_argument("--levels", default="1,8,32,128", help="offered concurrencies (default 1,8,32,128)")
    p.add_argument("--requests", type=int, default=1, help="requests per client at each level (default 1)")
    p.add_argument("--min-requests", type=int, default=4, help="at least this many requests per level (default 4)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    p.add_argument("--prompt-words", type=int, default=12, help="words per prompt (default 12, ~16 tokens)")
    p.add_argument("--shared-prefix-words", type=int, default=0,
                   help="every prompt starts with the same prefix of this many words (a system prompt, few-shot "
                        "examples): time to first token with prefix caching; add --peers gptgen-no-prefix-cache "
                        "for the same server recomputing every prompt (default 0: no shared prefix)")
    p.add_argument("--max-batch", type=int, default=32, help="gptgen's --max-batch (default 32)")
    p.add_argument("--peers", default="naive",
                   help="comma list of naive, gptgen-no-prefix-cache, gptgen-compiled, gptgen-int8dyn, "
                   "transformers, transformers-cb, llama.cpp (default naive)")
    p.add_argument("--gptgen-args", default="",
                   help="extra arguments for every gptgen server, e.g. '--quantize int8' (default none)")
    p.add_argument("--level-seconds", type=float, default=120,
                   help="a server whose level took longer than this skips the higher levels (default 120)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per server (default: torch's)")
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


# Servers ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, env: dict | None = None, model: str = "bench",
                 extra: dict | None = None) -> None:
        self.name, self.cmd, self.port, self.model = name, cmd, port, model
        self.extra = extra or {}  # request fields only this server understands
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-serve-{name.replace('.', '')}-", suffix=".log",
                                               delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not answer within {timeout:.0f} s: {self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return " | ".join(Path(self.log.name).read_text(errors="replace").strip().splitlines()[-3:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def server_env(threads: int | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def start_gptgen(name: str, model_dir: Path, max_batch: int, threads, extra_args=()) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "gptgen", "serve", "--model", str(model_dir), "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", "4096", "--served-model-name", "bench",
           "--log-level", "warning", *extra_args]
    return Server(name, cmd, port, env=server_env(threads), extra={"ignore_eos": True})


def start_transformers(hf_dir: Path, threads, continuous: bool = False) -> Server:
    exe = shutil.which("transformers")
    if exe is None:
        raise RuntimeError("the `transformers` command is not installed")
    port = free_port()
    cmd = [exe, "serve", str(hf_dir), "--device", "cpu", "--port", str(port), "--host", "127.0.0.1",
           "--log-level", "warning"] + (["--continuous-batching"] if continuous else [])
    name = "transformers-cb" if continuous else "transformers"
    return Server(name, cmd, port, env=server_env(threads), model=str(hf_dir))


def start_llama_cpp(gguf_path: Path, threads) -> Server:
    try:
        import llama_cpp  # noqa: F401
        import llama_cpp.server  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"llama-cpp-python[server] is not installed ({exc})") from None
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "1024", "--model_alias", "bench",
           "--n_threads", str(threads or os.cpu_count() or 1)]
    return Server("llama.cpp", cmd, port, env=server_env(threads))


# The model ----------------------------------------------------------------------------------------------------
def build_model(args, workdir: Path):
    import torch

    from gptgen import LanguageModel, Tokenizer, load

    if args.model:
        lm = load(args.model)
        native = Path(args.model)
    else:
        torch.manual_seed(0)
        tok = Tokenizer.from_pretrained(args.tokenizer)
        lm = LanguageModel.from_preset("gpt2", tok, n_layer=6, n_embd=384, n_head=6, n_positions=1024)
        native = lm.save(workdir / "native")
    return lm, native


def export_hf(lm, workdir: Path) -> Path:
    return lm.save(workdir / "hf", format="hf")


def write_gguf(lm, path: Path) -> Path:
    """The GPT-2 weights and byte-level BPE tokenizer as a GGUF file (llama.cpp's `gpt2` architecture)."""
    import gguf
    import numpy as np

    cfg = lm.config
    sd = {k: v.detach().float().cpu().numpy() for k, v in lm.model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_name("gptgen-bench")
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tok = lm.tokenizer
    vocab = tok.get_vocab()
    tokens = [None] * cfg.vocab_size
    for text, i in vocab.items():
        if i < cfg.vocab_size:
            tokens[i] = text
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    special = set(tok.special_tokens.values())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    merges = _merges(tok)
    if not merges:
        raise RuntimeError("the tokenizer has no BPE merges to write")
    w.add_token_merges(merges)
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    if tok.eos_token_id is not None:
        w.add_eos_token_id(tok.eos_token_id)
    names = _gguf_names(sd, cfg.n_layer)
    for ours, theirs in names.items():  # nn.Linear weights are (out, in), as llama.cpp stores them
        w.add_tensor(theirs, np.ascontiguousarray(sd[ours], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _merges(tok) -> list[str]:
    data = json.loads(tok.backend.to_str())
    merges = data.get("model", {}).get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _gguf_names(sd: dict, n_layer: int) -> dict:
    out = {}
    keys = set(sd)

    def pick(*cands):
        for c in cands:
            if c in keys:
                return c
        raise KeyError(f"none of {cands} in the state dict")

    out[pick("embed.wte.weight")] = "token_embd.weight"
    out[pick("embed.wpe.weight")] = "position_embd.weight"
    for i in range(n_layer):
        b = f"blocks.{i}."
        for ours, theirs in (("ln_1", "attn_norm"), ("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"),
                             ("ln_2", "ffn_norm"), ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")):
            for kind in ("weight", "bias"):
                if f"{b}{ours}.{kind}" in keys:
                    out[f"{b}{ours}.{kind}"] = f"blk.{i}.{theirs}.{kind}"
    out[pick("ln_f.weight")] = "output_norm.weight"
    out[pick("ln_f.bias")] = "output_norm.bias"
    if "lm_head.weight" in keys:
        out["lm_head.weight"] = "output.weight"
    return out


# The load --------------------------------------------------------------------------------------------------------
def make_prompts(count: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() for _ in range(count)]


async def one_request(client, server: Server, prompt: str, max_tokens: int) -> dict:
    # ignore_eos where the server knows it; elsewhere random weights make an early EOS (1 in 50,257) rare.
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **server.extra}
    start = time.perf_counter()
    stamps, usage = [], None
    async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {r.status_code} {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    tokens = usage["completion_tokens"] if usage else len(stamps)
    end = stamps[-1] if stamps else time.perf_counter()
    return {"ttft": (stamps[0] - start) if stamps else None, "tokens": tokens,
            "tpot": (end - stamps[0]) / (tokens - 1) if stamps and tokens > 1 else None}


async def run_level(server: Server, concurrency: int, total: int, max_tokens: int, prompts: list[str]) -> dict:
    import httpx

    queue = list(range(total))
    results = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker():
            while queue:
                i = queue.pop()
                results.append(await one_request(client, server, prompts[i % len(prompts)], max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    return {"server": server.name, "concurrency": concurrency, "requests": len(results), "tokens": tokens,
            "wall_s": wall, "tok_s": tokens / wall, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99)}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if q < 100 else values[-1]


def ms(x) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


# Main ----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x]
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    lm, native = build_model(args, workdir)
    print(f"model: {lm.num_parameters():,} parameters ({lm.config.n_layer} layers, {lm.config.n_embd} wide, "
          f"vocabulary {lm.config.vocab_size:,}); {args.max_tokens} tokens per request, "
          f"~{args.prompt_words}-word prompts; CPU threads: {os.cpu_count()}", flush=True)
    shared = make_prompts(1, args.shared_prefix_words, seed=12345)[0] if args.shared_prefix_words else ""
    if shared:
        print(f"shared prefix: {len(lm.tokenizer.encode(shared))} tokens before each prompt", flush=True)
    servers, skipped = [], {}
    try:
        extra = args.gptgen_args.split()
        servers.append(start_gptgen("gptgen", native, args.max_batch, args.threads, extra))
        if "naive" in peers:
            servers.append(start_gptgen("naive", native, 1, args.threads, extra))
        if "gptgen-no-prefix-cache" in peers:
            servers.append(start_gptgen("gptgen-no-prefix-cache", native, args.max_batch, args.threads,
                                        [*extra, "--no-prefix-caching"]))
        if "gptgen-compiled" in peers:
            servers.append(start_gptgen("gptgen-compiled", native, args.max_batch, args.threads,
                                        [*extra, "--compile"]))
        if "gptgen-int8dyn" in peers:
            servers.append(start_gptgen("gptgen-int8dyn", native, args.max_batch, args.threads,
                                        ["--quantize", "int8-dynamic"]))
        for name in ("transformers", "transformers-cb"):
            if name in peers:
                try:
                    hf_dir = workdir / "hf" if (workdir / "hf").exists() else export_hf(lm, workdir)
                    servers.append(start_transformers(hf_dir, args.threads, continuous=name.endswith("-cb")))
                except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                    skipped[name] = str(exc)
        if "llama.cpp" in peers:
            try:
                servers.append(start_llama_cpp(write_gguf(lm, workdir / "model.gguf"), args.threads))
            except Exception as exc:  # noqa: BLE001
                skipped["llama.cpp"] = str(exc)
        ready = []
        for s in servers:
            try:
                s.wait_ready(1800 if s.name == "gptgen-compiled" else 300)
                asyncio.run(run_level(s, 1, 2, 4, make_prompts(2, 4, seed=99)))  # warm up
                ready.append(s)
            except Exception as exc:  # noqa: BLE001
                skipped[s.name] = str(exc)
                s.stop()
        if not ready or ready[0].name != "gptgen":
            raise SystemExit(f"gptgen serve did not start: {skipped.get('gptgen')}")
        for name, reason in skipped.items():
            print(f"skipped {name}: {reason}", flush=True)
        results, too_slow = [], {}
        for li, c in enumerate(levels):
            total = max(args.min_requests, c * args.requests)
            prompts = make_prompts(total, args.prompt_words, seed=c)
            if shared:
                prompts = [shared + " " + p for p in prompts]
            order = ready if li % 2 == 0 else ready[::-1]  # interleave who goes first
            for s in order:
                if s.name in too_slow:
                    print(f"  {s.name:<16} c={c:<4} skipped: {too_slow[s.name]}", flush=True)
                    continue
                try:
                    r = asyncio.run(run_level(s, c, total, args.max_tokens, prompts))
                except Exception as exc:  # noqa: BLE001  a peer that breaks under load is reported, not fatal
                    if s.name == "gptgen":
                        raise
                    too_slow[s.name] = f"failed at c={c}: {type(exc).__name__}: {exc}"
                    print(f"  {s.name:<16} c={c:<4} {too_slow[s.name]}", flush=True)
                    continue
                results.append(r)
                if r["wall_s"] > args.level_seconds:
                    too_slow[s.name] = f"c={c} took {r['wall_s']:.0f} s (over --level-seconds)"
                print(f"  {s.name:<16} c={c:<4} {r['requests']:>4} req {r['tokens']:>6} tok {r['wall_s']:7.2f} s "
                      f"{r['tok_s']:8.1f} tok/s  TTFT p50/p99 {ms(r['ttft_p50'])}/{ms(r['ttft_p99'])} ms  "
                      f"per-token p50/p99 {ms(r['tpot_p50'])}/{ms(r['tpot_p99'])} ms", flush=True)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report(results, levels, [s.name for s in ready])
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "skipped": skipped, "results": results}, indent=1))
    return 0


def report(results: list[dict], levels: list[int], names: list[str]) -> None:
    """The table and the ratios; a level given twice (--levels 1,32,1,32) reports its last run."""
    levels = list(dict.fromkeys(levels))
    by = {(r["server"], r["concurrency"]): r for r in results}
    print("\nserver            conc   tok/s   TTFT p50   TTFT p99   tok-lat p50   tok-lat p99   (ms)")
    for name in names:
        for c in levels:
            r = by.get((name, c))
            if r:
                print(f"{name:<16} {c:>5} {r['tok_s']:7.1f} {ms(r['ttft_p50']):>10} {ms(r['ttft_p99']):>10} "
                      f"{ms(r['tpot_p50']):>13} {ms(r['tpot_p99']):>13}")
    g1 = by.get(("gptgen", 1))
    for c in levels:
        g = by.get(("gptgen", c))
        if g is None:
            continue
        parts = [f"gptgen c={c}: {g['tok_s'] / g1['tok_s']:.2f}x its c=1" if g1 else ""]
        for name in names[1:]:
            peer = by.get((name, c))
            if peer:
                parts.append(f"{g['tok_s'] / peer['tok_s']:.2f}x {name}")
        print("; ".join(p for p in parts if p))


if __name__ == "__main__":
    sys.exit(main())
