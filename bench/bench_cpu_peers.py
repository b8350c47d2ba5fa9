"""CPU decoding side by side with peers on the same random GPT-2 weights: HF transformers, CTranslate2
(float32, int8), llama.cpp through llama-cpp-python (f32, q8_0), and gptgen (fp32, bf16, int8 weight-only,
int8 weights and activations "int8dyn", which decodes through its native step; eager or with the compiled
decode step).

    pip install ctranslate2 llama-cpp-python gguf     # peers; a missing one is skipped with a printed line
    python bench/bench_cpu_peers.py                   # both shapes, greedy b1 and sampling b16
    python bench/bench_cpu_peers.py --shapes small --threads 1 --engines hf,gptgen-fp32,ct2-float32
    python bench/bench_cpu_peers.py --ppl             # int8/bf16 perplexity cost on a model trained on books

Instruction-set masks: an engine name with "@avx2" (or "@portable") runs with GPTGEN_CPU_FEATURES set to it
(gptgen: the AVX2 + FMA path), CT2_FORCE_CPU_ISA=AVX2 (CTranslate2's own kernels), ONEDNN_MAX_CPU_ISA=AVX2 and
MKL_ENABLE_INSTRUCTIONS=AVX2 (the GEMM libraries under CTranslate2 and PyTorch, which otherwise pick AVX512-VNNI
themselves) and ATEN_CPU_CAPABILITY=avx2 (PyTorch's own kernels), so an AVX-512 machine also measures what an
AVX2-only CPU runs. llama.cpp's ISA is fixed when it is built: "llama-*@avx2" runs with the interpreter given
by --llama-python-avx2, a venv whose llama-cpp-python was built for AVX2 (CMAKE_ARGS in docs/performance.md),
and each llama row prints the features its build reports. "gptgen-default" is what a user gets
with no option (the runner's choice: the native fp32 step on CPU); "gptgen-int8dyn" the best mode.
Batch-1 figures are also given as a fraction of the machine's memory bandwidth, measured in the same run
(a large copy on the same threads): bytes of weights read per token x tokens/s / copy bandwidth. The load
average (/proc/loadavg, 1 min) at each figure's runs is printed beside it: the machine may be shared.
The llama.cpp rows use gptgen's own GGUF writer (gptgen convert --to gguf) unless --llama-convert is given;
--llama-python runs the llama.cpp workers with another interpreter (a venv holding llama-cpp-python).

Each engine runs in its own process (torch, CTranslate2 and llama.cpp share the OpenMP runtime: in one
process they slow each other), rounds are interleaved (machine noise hits every engine alike) and the
median of the rounds is reported. Before timing, greedy tokens of gptgen fp32, HF and CTranslate2
float32 are compared: a fast wrong engine is no peer. With --llama-convert PATH the GGUF is made by llama.cpp's
own convert_hf_to_gguf.py (it ships in the llama-cpp-python sdist under vendor/llama.cpp/). llama.cpp greedy
batch 1 runs through the high-level Llama.generate; sampling batch 16 through the low-level API (llama_cpp):
one context with a sequence per prompt, all prompts prefilled in one llama_batch, then one batch of a token per
sequence each step, each sequence drawing from its own llama.cpp sampler chain (top-k, top-p, dist). The
batch-16 path loads the model with use_extra_bufts=False (no repacked weight buffers); llama-cpp-python 0.3.36's
Llama() swallows that keyword unused, so batch 1 runs with llama.cpp's default. A llama.cpp built with its AMX
int8 path dies in q8_0 with SIGILL on our AMX Xeon (the bench reports the crash and goes on); built without it
(CMAKE_ARGS in docs/performance.md, "Peers") q8_0 runs on AVX512-VNNI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"small": dict(n_layer=6, n_embd=384, n_head=6), "gpt2": dict(n_layer=12, n_embd=768, n_head=12)}
ENGINES = ("hf", "gptgen-default", "gptgen-fp32", "gptgen-bf16", "gptgen-int8", "gptgen-int8dyn", "gptgen-fp32-compile",
           "gptgen-bf16-compile", "gptgen-int8-compile", "ct2-float32", "ct2-int8",
           "llama-f32", "llama-q8_0")
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="small,gpt2")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--cases", default="greedy,sample", help="greedy (batch 1) and/or sample (top-k 50, top-p 0.95)")
    p.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-convert", help="path of llama.cpp's convert_hf_to_gguf.py (default: gptgen's writer)")
    p.add_argument("--llama-python", help="a Python interpreter with llama-cpp-python (default: this one)")
    p.add_argument("--llama-python-avx2", help="the interpreter for llama-*@avx2: llama-cpp-python built without "
                   "AVX-512 (without it those rows are skipped)")
    p.add_argument("--tokenizer", default=os.environ.get("GPTGEN_DATA_DIR", str(REPO.parent / "shared" / "data"))
                   + "/gpt2-tokenizer", help="a GPT-2 tokenizer directory (CTranslate2 needs the vocabulary)")
    p.add_argument("--workdir", help="keep converted models here (default: a temporary directory)")
    p.add_argument("--ppl", action="store_true", help="measure the perplexity cost of int8/bf16 instead")
    p.add_argument("--ppl-model", help="with --ppl: a model trained by `gptgen train --recipe keras-mini` (its "
                   "books validation split is the held-out text) instead of training one here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# Models -------------------------------------------------------------------------------------------------
def make_hf_dir(shape: str, root: Path, tokenizer_dir: str) -> Path:
    """Random GPT-2 weights (seed 0) as an HF directory with a GPT-2 tokenizer and n_ctx in config.json."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = root / f"hf-{shape}"
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, bos_token_id=50256, eos_token_id=50256, **SHAPES[shape])
    GPT2LMHeadModel(cfg).save_pretrained(out, safe_serialization=True)
    config = json.loads((out / "config.json").read_text())
    config["n_ctx"] = config["n_positions"]  # llama.cpp's converter reads it; current transformers omits it
    (out / "config.json").write_text(json.dumps(config, indent=2))
    # GPT-2's files under their HF names (OpenAI's encoder.json / vocab.bpe are vocab.json / merges.txt)
    for src, dst in (("vocab.json", "vocab.json"), ("encoder.json", "vocab.json"), ("merges.txt", "merges.txt"),
                     ("vocab.bpe", "merges.txt")):
        if (Path(tokenizer_dir) / src).is_file():
            shutil.copy(Path(tokenizer_dir) / src, out / dst)
    return out


def convert_ct2(hf_dir: Path, quant: str) -> Path | None:
    try:
        import ctranslate2  # noqa: F401
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        return None
    out = hf_dir.parent / f"{hf_dir.name}-ct2-{quant}"
    if not (out / "model.bin").is_file():
        TransformersConverter(str(hf_dir)).convert(str(out), quantization=quant, force=True)
    return out


def convert_gguf(hf_dir: Path, outtype: str, script: str | None) -> Path | None:
    """The GGUF file of hf_dir: llama.cpp's converter where given, else `gptgen convert --to gguf`."""
    out = hf_dir.parent / f"{hf_dir.name}-{outtype}{'-llamacpp' if script else ''}.gguf"
    if out.is_file():
        return out
    if script:
        subprocess.run([sys.executable, script, str(hf_dir), "--outfile", str(out), "--outtype", outtype],
                       check=True, stdout=subprocess.DEVNULL)
    else:
        subprocess.run([sys.executable, "-m", "gptgen", "convert", str(hf_dir), str(out), "--to", "gguf",
                        "--gguf-type", outtype, "--tokenizer", str(hf_dir)], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    return out


def copy_bandwidth(threads: int, mib: int = 512) -> float:
    """Bytes per second of a large tensor copy (read + write) on `threads` threads: the median of 5."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(mib * 2 ** 18)  # float32: mib MiB
    b = torch.empty_like(a)
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t0)
    return 2 * a.numel() * 4 / statistics.median(times[1:])


def weight_bytes_per_token(engine: str, shape: str) -> float:
    """Bytes of weights one batch-1 decode step reads: every block matrix, the (tied) head, biases and norms;
    per element 4 (fp32), 2 (bf16), 1 (+ a float32 scale per row) for int8, 34/32 for q8_0."""
    cfg = SHAPES[shape]
    c, layers, vocab = cfg["n_embd"], cfg["n_layer"], 50257
    matrices = layers * 12 * c * c + vocab * c
    rows = layers * (3 * c + c + 4 * c + c) + vocab
    small = layers * (4 * c + 13 * c)  # norms and biases
    if "int8" in engine:
        return matrices + 4 * rows + 4 * small
    if "q8_0" in engine:
        return matrices * 34 / 32 + 4 * small
    if "bf16" in engine:
        return 2 * (matrices + small)
    return 4 * (matrices + small)


def loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# Workers: one engine, one case, in its own process ------------------------------------------------------
def prompts_for(job) -> list[list[int]]:
    import random

    rng = random.Random(0)
    batch = 1 if job["case"] == "greedy" else job["batch"]
    return [[rng.randrange(50256) for _ in range(job["prompt_len"])] for _ in range(batch)]


def llama_batched(gguf: str, prompts: list[list[int]], new: int, threads: int, top_k: int = 50,
                  top_p: float = 0.95, seed: int = 0):
    """llama.cpp sampling of all prompts at once through llama-cpp-python's low-level API: one context with a
    sequence per prompt, the prompts prefilled in one llama_batch, then one batch of a token per sequence each
    step; each sequence draws from its own llama.cpp sampler chain (top-k, top-p, dist seeded seed + its
    index). Returns (run, close): run() gives `new` tokens per prompt (no EOS stop), close() frees it all."""
    import llama_cpp as L

    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    mparams.use_extra_bufts = False  # no repacked weight buffers (the AMX int8 path among them)
    model = L.llama_model_load_from_file(gguf.encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf}")
    n_seq, n_prompt = len(prompts), sum(len(p) for p in prompts)
    cparams = L.llama_context_default_params()
    cparams.n_seq_max = n_seq
    cparams.n_ctx = n_seq * (max(len(p) for p in prompts) + new)  # split evenly across the sequences
    cparams.n_batch = cparams.n_ubatch = max(n_prompt, n_seq)  # the whole prefill in one ubatch
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        L.llama_model_free(model)
        raise RuntimeError("llama.cpp could not create the context")
    batch = L.llama_batch_init(max(n_prompt, n_seq), 0, 1)

    def fill(entries):  # entries: (token, pos, seq, wants logits)
        for i, (tok, pos, seq, out) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, out
        batch.n_tokens = len(entries)

    def decode():
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def run():
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        chains = []
        for s in range(n_seq):
            chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(top_k))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(top_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed + s))
            chains.append(chain)
        try:
            fill([(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)])
            decode()
            idx = [sum(len(q) for q in prompts[:s + 1]) - 1 for s in range(n_seq)]  # each prompt's last token
            out: list[list[int]] = [[] for _ in prompts]
            while True:
                for s in range(n_seq):
                    out[s].append(L.llama_sampler_sample(chains[s], ctx, idx[s]))
                if len(out[0]) == new:
                    return out
                fill([(out[s][-1], len(prompts[s]) + len(out[s]) - 1, s, True) for s in range(n_seq)])
                decode()
                idx = list(range(n_seq))
        finally:
            for chain in chains:
                L.llama_sampler_free(chain)  # a chain frees the samplers added to it

    def close():
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)

    return run, close


def worker(engine: str, job: dict) -> dict:
    threads, new = job["threads"], job["new_tokens"]
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    prompts = prompts_for(job)
    greedy = job["case"] == "greedy"
    close = None  # set by engines whose native objects are freed by hand after the timed run
    if engine == "hf" or engine.startswith("gptgen"):
        import torch

        torch.set_num_threads(threads)
    if engine == "hf":
        import torch
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(job["hf_dir"]).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        ids = torch.tensor(prompts)
        kw = dict(do_sample=False) if greedy else dict(do_sample=True, top_k=50, top_p=0.95)

        def run():
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, **kw)
            return out[:, ids.shape[1]:].tolist()
    elif engine.startswith("gptgen"):
        import torch

        sys.path.insert(0, str(REPO / "src"))
        from gptgen.checkpoint import load_model
        from gptgen.generation import generate_ids

        model = load_model(job["hf_dir"]).eval()
        if "-bf16" in engine:
            model.to(torch.bfloat16)
        elif "-int8" in engine:
            from gptgen.quantize import quantize_model

            quantize_model(model, "int8-dynamic" if "-int8dyn" in engine else "int8")
        compile_ = engine.endswith("-compile")
        if engine.startswith("gptgen-default"):
            compile_ = None  # the runner's default choice
        kw = dict(do_sample=False) if greedy else dict(do_sample=True, top_k=50, top_p=0.95, seed=0)
        if compile_:
            t0 = time.perf_counter()
            generate_ids(model, prompts, max_new_tokens=4, eos_token_id=[], compile=True, **kw)
            job["compile_s"] = round(time.perf_counter() - t0, 1)
            if greedy:  # the compiled step must give the eager step's tokens on the same weights
                job["eager_tokens"] = generate_ids(model, prompts[:1], max_new_tokens=min(new, 32), eos_token_id=[],
                                                   compile=False)[0]

        if compile_ is None:
            def run():
                return generate_ids(model, prompts, max_new_tokens=new, eos_token_id=[], **kw)
        else:
            def run():
                return generate_ids(model, prompts, max_new_tokens=new, eos_token_id=[], compile=compile_, **kw)
        from gptgen import native

        job["native"] = f"native library path {native.status()['decoder'].get('path')}"
    elif engine.startswith("ct2"):
        import threading

        import ctranslate2
        from transformers import GPT2TokenizerFast

        tok = GPT2TokenizerFast.from_pretrained(job["hf_dir"])
        holder = {}
        compute = engine.split("-", 1)[1]

        def build():  # built in a short-lived thread: measured faster than building it in the main thread
            holder["g"] = ctranslate2.Generator(job["ct2_dir"], device="cpu", compute_type=compute,
                                                intra_threads=threads)
        t = threading.Thread(target=build)
        t.start()
        t.join()
        gen = holder["g"]
        starts = [tok.convert_ids_to_tokens(p) for p in prompts]
        kw = (dict(sampling_topk=1) if greedy else dict(sampling_topk=50, sampling_topp=0.95, sampling_temperature=1.0))

        def run():
            res = gen.generate_batch(starts, max_length=new, min_length=new, include_prompt_in_result=False,
                                     end_token=[], **kw)
            return [r.sequences_ids[0] for r in res]
    elif engine.startswith("llama") and not greedy:
        run, close = llama_batched(job["gguf"], prompts, new, threads)
    elif engine.startswith("llama"):
        from llama_cpp import Llama

        llm = Llama(model_path=job["gguf"], n_ctx=256, n_threads=threads, n_threads_batch=threads,
                    verbose=False, use_extra_bufts=False)

        def run():
            llm.reset()
            out = []
            for tok_id in llm.generate(prompts[0], top_k=1, temp=0.0, reset=True):
                out.append(int(tok_id))
                if len(out) == new:
                    break
            return [out]
    else:
        raise SystemExit(f"unknown engine {engine}")
    if engine.startswith("llama"):  # what this llama.cpp build runs (its instruction set is fixed when built)
        import re

        import llama_cpp

        found = re.findall(r"(\w+) = 1", llama_cpp.llama_print_system_info().decode())
        job["native"] = "llama.cpp build " + "+".join(f for f in found if f.startswith(("AVX", "AMX", "FMA")))
    run()  # warm-up
    t0 = time.perf_counter()
    tokens = run()
    dt = time.perf_counter() - t0
    if close:
        close()
    assert all(len(t) == new for t in tokens), [len(t) for t in tokens]
    return {"tokens_per_s": len(prompts) * new / dt, "tokens": tokens[0][:32], "compile_s": job.get("compile_s"),
            "eager_tokens": job.get("eager_tokens"), "native": job.get("native")}


# What each mask sets: gptgen's path, CTranslate2's own kernels, and the libraries under CTranslate2 and PyTorch
# (oneDNN, MKL, ATen's vectorized kernels), which pick their instruction set themselves: CT2_FORCE_CPU_ISA alone
# leaves CTranslate2's int8 GEMM (oneDNN) on AVX512-VNNI.
ISA_MASKS = {
    "avx2": dict(GPTGEN_CPU_FEATURES="avx2", CT2_FORCE_CPU_ISA="AVX2", ONEDNN_MAX_CPU_ISA="AVX2",
                 DNNL_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2", ATEN_CPU_CAPABILITY="avx2"),
    "portable": dict(GPTGEN_CPU_FEATURES="portable", CT2_FORCE_CPU_ISA="GENERIC", ONEDNN_MAX_CPU_ISA="SSE41",
                     DNNL_MAX_CPU_ISA="SSE41", MKL_ENABLE_INSTRUCTIONS="SSE4_2", ATEN_CPU_CAPABILITY="default"),
}


def run_worker(engine: str, job: dict, python: str | None = None) -> dict:
    base, _, isa = engine.partition("@")
    cmd = [python or sys.executable, __file__, "--worker", base, "--job", json.dumps(job)]
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"])}
    if isa:
        env.update(ISA_MASKS[isa])
    load = loadavg()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode < 0 or proc.returncode > 128:
        return {"error": f"crashed (signal {abs(proc.returncode) % 128})"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load"] = load
    return out


# Perplexity cost of int8 / bf16 --------------------------------------------------------------------------
def ppl_cost(args) -> int:
    """Train a small GPT on books (a few minutes), then held-out perplexity in fp32, bf16 and int8."""
    import copy

    import torch

    sys.path.insert(0, str(REPO / "src"))
    from gptgen.data import registry
    from gptgen.hardware import cpu_bf16_native
    from gptgen.lm import LanguageModel
    from gptgen.quantize import quantize_model
    from gptgen.tokenizer import Tokenizer
    from gptgen.training import evaluate, fit

    torch.set_num_threads(args.threads)
    # the keras-mini recipe's data: paragraphs of the books, every 10th held out
    train, val = registry.resolve_dataset("books", seed=0)
    if args.ppl_model:
        from gptgen.lm import load

        lm = load(args.ppl_model)
        print(f"model {args.ppl_model} ({lm.num_parameters():,} parameters)")
    else:
        tok = Tokenizer.train("wordpiece", train, 5000, lowercase=True, reserved_tokens=["[PAD]", "[UNK]", "[BOS]"])
        torch.manual_seed(0)
        lm = LanguageModel.from_preset("mini", tok)
        t0 = time.perf_counter()
        fit(lm, train, val, epochs=1, batch_size=64, lr=1e-3, seq_len=128, add_bos=True, precision="fp32",
            progress=False)
        print(f"trained {lm.num_parameters():,} parameters for 1 epoch in {time.perf_counter() - t0:.0f} s")
    lm.model.eval()
    tok = lm.tokenizer
    rows = [("fp32", lm)]
    if cpu_bf16_native():
        rows.append(("bf16 weights", LanguageModel(copy.deepcopy(lm.model).to(torch.bfloat16), tok)))
    rows.append(("int8 weights, fp32 activations",
                 LanguageModel(quantize_model(copy.deepcopy(lm.model), compute_dtype=torch.float32), tok)))
    if cpu_bf16_native():
        rows.append(("int8 weights, bf16 activations",
                     LanguageModel(quantize_model(copy.deepcopy(lm.model), compute_dtype=torch.bfloat16), tok)))
    for dtype in (torch.float32, torch.bfloat16) if cpu_bf16_native() else (torch.float32,):
        rows.append((f"int8 weights and activations ({'bf16' if dtype == torch.bfloat16 else 'fp32'} rest)",
                     LanguageModel(quantize_model(copy.deepcopy(lm.model), "int8-dynamic", compute_dtype=dtype), tok)))
    base = None
    for name, model in rows:
        ppl = evaluate(model, val, batch_size=32, seq_len=128, add_bos=True, device="cpu")["perplexity"]
        base = base or ppl
        print(f"{name:<34} held-out ppl {ppl:8.2f}  ({(ppl / base - 1) * 100:+.2f}%)")
    return 0


# Driver ---------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.job))))
        return 0
    if args.ppl:
        return ppl_cost(args)
    engines = [e for e in args.engines.split(",") if e]
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gptgen-peers-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        print("# skipped CTranslate2: not installed (pip install ctranslate2)")
        engines = [e for e in engines if not e.startswith("ct2")]
    llama_python = args.llama_python or sys.executable
    has_llama = subprocess.run([llama_python, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    if not has_llama:
        print("# skipped llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python; or pass "
              "--llama-python)")
        engines = [e for e in engines if not e.startswith("llama")]
    sys.path.insert(0, str(REPO / "src"))
    from gptgen.hardware import cpu_features

    flags = sorted(f for f in cpu_features().flags if f.startswith(("avx", "fma", "amx", "f16c")))
    print(f"# {cpu_features().describe()}; threads={args.threads}; each engine in its own process, {args.rounds} interleaved "
          "rounds, median")
    print(f"# CPU flags: {' '.join(flags)}")
    bandwidth = copy_bandwidth(args.threads)
    print(f"# copy bandwidth ({args.threads} threads, 512 MiB float32 copy): {bandwidth / 1e9:.1f} GB/s "
          f"(load {loadavg()})")
    for shape in args.shapes.split(","):
        hf_dir = make_hf_dir(shape, root, args.tokenizer)
        paths = {"hf_dir": str(hf_dir)}
        for e in engines:
            kind = e.partition("@")[0].split("-", 1)[1] if "-" in e else ""
            if e.startswith("ct2"):
                paths[e] = str(convert_ct2(hf_dir, kind))
            if e.startswith("llama"):
                paths[e] = str(convert_gguf(hf_dir, kind, args.llama_convert))
        for case in args.cases.split(","):
            job = dict(case=case, batch=args.sample_batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                       threads=args.threads, hf_dir=paths["hf_dir"])
            results: dict[str, list] = {e: [] for e in engines}
            loads: dict[str, list] = {e: [] for e in engines}
            info: dict[str, dict] = {}
            for r in range(args.rounds):
                for e in engines:
                    j = dict(job, ct2_dir=paths.get(e), gguf=paths.get(e))
                    if e.startswith("llama") and e.endswith("@avx2"):
                        if not args.llama_python_avx2:
                            info[e] = {"skipped": "llama.cpp's instruction set is fixed at build: pass "
                                                  "--llama-python-avx2 (llama-cpp-python built for AVX2)"}
                            continue
                        res = run_worker(e, j, args.llama_python_avx2)
                    else:
                        res = run_worker(e, j, llama_python if e.startswith("llama") else None)
                    if "tokens_per_s" in res:
                        results[e].append(res["tokens_per_s"])
                        loads[e].append(res.get("load"))
                    info[e] = res
                if r == 0 and case == "greedy":
                    ref = {e: info[e].get("tokens") for e in info
                       if e.partition("@")[0] in ("gptgen-fp32", "gptgen-default", "hf", "ct2-float32", "llama-f32")}
                    toks = [t for t in ref.values() if t]
                    same = all(t == toks[0] for t in toks)
                    print(f"# {shape} greedy tokens agree across {', '.join(ref)}: {'yes' if same else 'NO'}")
                    for e in engines:
                        t = info[e].get("tokens")
                        if t and toks:
                            n = next((i for i, (a, b) in enumerate(zip(t, toks[0])) if a != b), len(t))
                            print(f"#   {e}: first {n} of {len(t)} checked tokens equal gptgen fp32")
                        eager = info[e].get("eager_tokens")
                        if t and eager:
                            n = next((i for i, (a, b) in enumerate(zip(t, eager)) if a != b), len(eager))
                            verdict = "" if n == len(eager) else "  <-- COMPILED STEP DIFFERS FROM EAGER"
                            print(f"#   {e}: first {n} of {len(eager)} tokens equal its eager step{verdict}")
            hf = statistics.median(results["hf"]) if results.get("hf") else None
            print(f"\n{shape} {case} (batch {1 if case == 'greedy' else args.sample_batch}, "
                  f"{args.prompt_len}-token prompt, {args.new_tokens} new)")
            for e in engines:
                if not results[e]:
                    print(f"  {e:<22} {info[e].get('skipped') or info[e].get('error', 'no result')}")
                    continue
                med = statistics.median(results[e])
                extra = f"  (first-call compile {info[e]['compile_s']} s)" if info[e].get("compile_s") else ""
                if info[e].get("native"):
                    extra += f"  [{info[e]['native']}]"
                ratio = f"{med / hf:5.2f}x HF" if hf else ""
                if case == "greedy":
                    frac = weight_bytes_per_token(e, shape) * med / bandwidth
                    ratio += f"  {100 * frac:5.1f}% of copy bw"
                load = [x for x in loads[e] if x is not None]
                print(f"  {e:<26} {med:9.1f} tok/s  {ratio}  runs {[round(x) for x in results[e]]}"
                      f"  load {'/'.join(f'{x:.1f}' for x in load)}{extra}")
            sys.stdout.flush()
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
