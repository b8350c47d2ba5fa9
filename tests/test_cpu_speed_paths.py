"""CPU speed paths: feature detection, precision="auto", int8 weights, bf16 decoding, the compiled step.

Oracles: /proc/cpuinfo for detection, the fp32 model for bf16/int8 (stated tolerances), the dequantized
fp32 product for Int8Linear, the eager decode step for the compiled one.
"""

import copy
import shutil

import pytest
import torch

import gptgen.native

from gptgen import hardware
from gptgen.config import GPTConfig
from gptgen.errors import ConfigError
from gptgen.generation import generate_ids
from gptgen.generation.engine import ModelBackend
from gptgen.model import GPT
from gptgen.quantize import Int8Linear, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")

NATIVE_BF16 = hardware.cpu_features().bf16_native


def tiny_gpt(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, init_std=0.2)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def test_cpu_features_agree_with_proc_cpuinfo():
    feats = hardware.cpu_features()
    if not feats.flags:
        pytest.skip("no /proc/cpuinfo flags on this system")
    assert feats.avx512_bf16 == ("avx512_bf16" in feats.flags)
    assert feats.amx_bf16 == ("amx_bf16" in feats.flags and "amx_tile" in feats.flags)
    assert feats.bf16_native == (feats.amx_bf16 or feats.avx512_bf16)
    if hardware.cpu_mask() in (None, "avx512", "amx"):
        assert feats.capability == torch.backends.cpu.get_cpu_capability()
    else:  # GPTGEN_CPU_FEATURES=avx2 / portable: what such a CPU reports, and no AVX-512 flag left
        assert feats.capability in ("AVX2", "DEFAULT") and not any(f.startswith("avx512") for f in feats.flags)


@pytest.mark.parametrize("env,want", [("1", "bf16"), ("0", "fp32")])
def test_auto_precision_follows_bf16_support(monkeypatch, env, want):
    monkeypatch.setenv("GPTGEN_CPU_BF16", env)
    choice, reason = hardware.auto_precision("cpu", allow_cpu_bf16=True)
    assert choice == want and "CPU" in reason
    assert hardware.auto_precision("cpu", allow_cpu_bf16=False)[0] == "fp32"
    monkeypatch.delenv("GPTGEN_CPU_BF16")
    assert hardware.auto_precision("cpu", allow_cpu_bf16=True)[0] == ("bf16" if NATIVE_BF16 else "fp32")


@pytest.mark.parametrize("env,want", [("1", "bf16"), ("0", "fp32")])
def test_fit_records_the_auto_precision(monkeypatch, env, want):
    from gptgen.data.packing import pack_examples
    from gptgen.lm import LanguageModel
    from gptgen.tokenizer import Tokenizer
    from gptgen.training import fit

    monkeypatch.setenv("GPTGEN_CPU_BF16", env)
    monkeypatch.setattr(hardware, "CPU_AUTO_BF16", True)  # the switch that makes auto pick CPU bf16
    tok = Tokenizer.train("wordpiece", [f"the cat {w} sat" for w in ("a", "b", "c")], 60, min_frequency=1,
                          reserved_tokens=["[PAD]", "[UNK]", "[BOS]"])
    lm = LanguageModel(tiny_gpt(vocab_size=max(97, tok.vocab_size)), tok)
    g = torch.Generator().manual_seed(0)
    data = pack_examples([torch.randint(3, 90, (12,), generator=g).tolist() for _ in range(8)], 16, bos_id=2, pad_id=0)
    result = fit(lm, data, max_steps=1, batch_size=4, precision="auto", device="cpu", progress=False)
    begin = [r for r in result.history if r["event"] == "begin"]
    assert len(begin) == 1 and begin[0]["precision"] == want


def test_weight_only_int8_computes_in_fp32_where_the_native_step_decodes_it(monkeypatch):
    """On a CPU with bf16 units (forced here) int8-dynamic keeps bf16 compute, but weight-only int8 computes in
    fp32 wherever the native step runs (its products sum in fp32; bf16 would only add roundings)."""
    from gptgen.config import GPTConfig
    from gptgen.model import GPT
    from gptgen.native import int8 as int8_ops
    from gptgen.quantize import quantize_model

    monkeypatch.setenv("GPTGEN_CPU_BF16", "1")

    def dtype_after(mode):
        m = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
        return quantize_model(m, mode).embed.wte.weight.dtype

    assert dtype_after("int8") == (torch.float32 if int8_ops.available() else torch.bfloat16)
    if int8_ops.available():
        assert dtype_after("int8-dynamic") == torch.bfloat16


def test_int8_linear_equals_the_dequantized_product():
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40)
    q = Int8Linear(lin.weight, lin.bias, torch.float32)
    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dequantized(), lin.bias), rtol=1e-5, atol=1e-5)
    # few rows take PyTorch's weight-only kernel where it is exact (it was not on aarch64 at widths off a
    # multiple of 8): every width gives the dequantized product
    for k in (48, 63, 100):
        lk = torch.nn.Linear(k, 24)
        qk = Int8Linear(lk.weight, lk.bias, torch.float32)
        for rows in (1, 3, 5):
            xk = torch.randn(rows, k)
            torch.testing.assert_close(qk(xk), torch.nn.functional.linear(xk, qk.dequantized(), lk.bias),
                                       rtol=1e-5, atol=1e-5)
    # per-row absmax scaling: the weight error is at most half a step of each row
    err = (q.dequantized() - lin.weight).abs().amax(dim=1)
    assert bool((err <= q.scale.float() / 2 + 1e-7).all())


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not NATIVE_BF16, reason="no native bf16 on this CPU"))])
def test_int8_model_logits_stay_close_to_fp32(dtype):
    ref = tiny_gpt()
    q = quantize_model(copy.deepcopy(ref), compute_dtype=dtype)
    assert isinstance(q.lm_head, Int8Linear) and isinstance(q.blocks[0].mlp.c_fc, Int8Linear)
    idx = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(idx), q(idx).float()
    # Tolerance: the logit error is a few percent of the logits' spread (int8 steps are 1/254 of a row's
    # range; bf16 activations add ~0.4% per product): mean < 3%, worst < 20%; teacher-forced argmax
    # agrees on >= 90% of positions.
    err = (a - b).abs() / a.std()
    assert err.mean() < 0.03 and err.max() < 0.2
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    # the engine runs the quantized head and decodes the same number of tokens
    out = generate_ids(q, [[1, 2, 3]], max_new_tokens=6, eos_token_id=[])
    assert len(out[0]) == 6
    with pytest.raises(ConfigError):
        quantize_model(q)


def test_unknown_quantization_is_a_config_error():
    with pytest.raises(ConfigError, match="int8"):
        quantize_model(tiny_gpt(), mode="int4")


@pytest.mark.skipif(not NATIVE_BF16, reason="no native bf16 on this CPU")
def test_bf16_decoding_tracks_fp32():
    ref = tiny_gpt()
    bf = copy.deepcopy(ref).to(torch.bfloat16)
    idx = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        agree = (ref(idx).argmax(-1) == bf(idx).float().argmax(-1)).float().mean()
    assert agree >= 0.9  # tolerance: bf16 keeps 8 bits of mantissa; near-ties may flip
    a = generate_ids(ref, [[5, 6, 7]], max_new_tokens=8, eos_token_id=[])
    b = generate_ids(bf, [[5, 6, 7]], max_new_tokens=8, eos_token_id=[])
    assert a[0][0] == b[0][0] and len(b[0]) == 8


HAS_COMPILER = shutil.which("g++") is not None or shutil.which("gcc") is not None
BF16_ONLY = pytest.mark.skipif(not NATIVE_BF16, reason="no native bf16 on this CPU")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_COMPILER, reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("mode", ["fp32", pytest.param("bf16", marks=BF16_ONLY),
                                  pytest.param("int8", marks=BF16_ONLY), "int8-fp32"])
def test_compiled_cpu_step_matches_eager(mode, monkeypatch):
    """The compiled step (frozen weights, inductor's GEMM templates, its own attention) gives the eager
    step's logits in every weight mode, and the same greedy tokens."""
    monkeypatch.setattr(gptgen.native, "decoder", lambda model: None)  # inductor's step, not the native one
    model = tiny_gpt(n_layer=1, n_embd=16, n_head=2)
    with torch.no_grad():  # biases that are not zero: a GEMM's bias epilogue is checked too
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    if mode == "bf16":
        model.to(torch.bfloat16)
    elif mode.startswith("int8"):
        quantize_model(model, compute_dtype=torch.float32 if mode == "int8-fp32" else torch.bfloat16)
    tol = 1e-4 if mode in ("fp32", "int8-fp32") else 3e-2
    prompts = [[3, 4, 5, 6], [7, 8]]  # left padding in the batch
    eager, compiled = ModelBackend(model, compile=False), ModelBackend(model, compile=True)
    from gptgen.generation.engine import DecodeState

    def state():
        return DecodeState(prompts=prompts, rows_per_prompt=1, num_return_sequences=1, max_new_tokens=5,
                           eos_ids=[], pad_id=0, device="cpu", generator=None, processors=[])

    with torch.no_grad():
        s1, s2 = state(), state()
        l1, _ = eager.prefill(s1, None)
        l2, _ = compiled.prefill(s2, None)
        for slot in range(s1.prompt_len, s1.prompt_len + 3):
            feed = l1.argmax(-1)
            l1, _ = eager.step(feed, slot, None)
            l2, _ = compiled.step(feed, slot, None)
            torch.testing.assert_close(l2, l1, rtol=tol, atol=tol)
    eager.close()
    compiled.close()
    greedy = generate_ids(model, prompts, max_new_tokens=6, eos_token_id=[], compile=False)
    compiled_greedy = generate_ids(model, prompts, max_new_tokens=6, eos_token_id=[], compile=True)
    if tol < 1e-3:  # in bf16 near-ties may break either way; the logits above are the check there
        assert compiled_greedy == greedy
    model.clear_kv_cache()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_COMPILER, reason="inductor needs a C++ compiler")
def test_compiled_int8_steps_of_two_models_of_one_shape_keep_their_own_weights(monkeypatch):
    """Two int8 models of the same shape, compiled one after the other: each compiled step gives its own
    model's greedy tokens. (Inductor's FX graph cache keyed the second graph like the first and handed it
    the first model's frozen int8 weights, which are buffers, not parameters.)"""
    monkeypatch.setattr(gptgen.native, "decoder", lambda model: None)  # inductor's step, not the native one
    prompts = [[3, 4, 5, 6]]
    for seed in (0, 1):
        model = quantize_model(tiny_gpt(seed, n_layer=1, n_embd=16, n_head=2), compute_dtype=torch.float32)
        eager = generate_ids(model, prompts, max_new_tokens=8, eos_token_id=[], compile=False)
        assert generate_ids(model, prompts, max_new_tokens=8, eos_token_id=[], compile=True) == eager


def test_cached_head_follows_weights_a_fused_optimizer_changes():
    """torch's fused AdamW updates parameters without bumping their version counter: the cached transposed
    head (and the compiled step's weights key) must still see the new weights."""
    from gptgen.native import weights_key

    model = tiny_gpt()
    prompts = [[3, 4, 5]]
    generate_ids(model, prompts, max_new_tokens=4, eos_token_id=[])  # caches the transposed head
    key = weights_key(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    version = model.lm_head.weight._version
    opt.step()
    assert model.lm_head.weight._version == version  # the premise: no version bump
    assert weights_key(model) != key
    torch.testing.assert_close(model.transposed_head(), model.lm_head.weight.detach().t())
    fresh = copy.deepcopy(model)
    assert generate_ids(model, prompts, max_new_tokens=4, eos_token_id=[]) == \
        generate_ids(fresh, prompts, max_new_tokens=4, eos_token_id=[])


def test_compiled_cpu_step_without_a_cxx_compiler_is_one_clear_error(monkeypatch):
    from gptgen.errors import GenerationError
    from gptgen.generation import engine

    # inductor's step (a float32 model takes the native step instead where its library is already built)
    monkeypatch.setattr(gptgen.native, "decoder", lambda model: None)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(GenerationError, match="needs a C\\+\\+ compiler"):
        generate_ids(tiny_gpt(), [[3, 4, 5]], max_new_tokens=2, eos_token_id=[], compile=True)


def test_a_float32_model_takes_the_native_step_where_it_runs(monkeypatch):
    """Float32 weights on CPU decode through the native step (the weights packed into a copy; nothing compiled)
    where its library runs, whatever `compile` says: logits within float rounding of the eager step's, the
    same greedy tokens, and a rebuild after the weights change in place."""
    from gptgen.native import int8 as int8_ops
    from gptgen.generation import engine

    if not int8_ops.available():
        pytest.skip(f"the native step's library is unavailable here: {int8_ops.status()['detail']}")
    model = tiny_gpt(5)
    prompts = [[3, 4, 5, 6], [7, 8]]
    backend, eager = engine.ModelBackend(model, compile=True), engine.ModelBackend(model)
    from gptgen.generation.loop import DecodeState

    def state():
        return DecodeState(prompts=prompts, rows_per_prompt=1, num_return_sequences=1, max_new_tokens=4,
                           eos_ids=[], pad_id=0, device="cpu", generator=None, processors=[])

    def layers(**options):  # the model's own forward at every step
        with monkeypatch.context() as m:
            m.setattr(gptgen.native, "decoder", lambda model: None)
            return generate_ids(model, prompts, max_new_tokens=12, eos_token_id=[], **options)

    logits = []
    for be in (backend, eager):
        st = state()
        with torch.inference_mode(), monkeypatch.context() as m:
            if be is eager:
                m.setattr(gptgen.native, "decoder", lambda model: None)
            be.prefill(st, False)
            logits.append(be.step(torch.tensor([9, 10]), st.prompt_len, False)[0])
        be.close()
    assert backend.native is not None and eager.native is None
    assert torch.allclose(logits[0], logits[1], atol=1e-5, rtol=0)
    want = layers()
    for compile in (None, False, True):
        assert generate_ids(model, prompts, max_new_tokens=12, eos_token_id=[], compile=compile) == want
    with torch.no_grad():  # an in-place update (an optimizer step would do this): the packed copy is rebuilt
        model.lm_head.weight.mul_(-1.0)
    assert generate_ids(model, prompts, max_new_tokens=12, eos_token_id=[]) == layers()


@pytest.mark.parametrize("mask,mode,says", [
    ("portable", "int8-dynamic", "no vector int8 kernel on this CPU"),
    ("portable", "int8", "no vector kernel on this CPU"),
    ("avx2 native-off", "int8", "no AVX512-BF16 or AMX"),
    ("avx2", "int8", None),
    ("avx2", "int8-dynamic", None),
])
def test_a_quantize_mode_without_a_fast_path_says_so_once_at_load(mask, mode, says):
    """On a CPU (here: masked by GPTGEN_CPU_FEATURES) where a quantize mode has no fast path, quantizing says so
    in one stderr line naming what is missing and what runs instead, once per process; where it has one
    (both int8 modes on AVX2, through the native step), nothing is said. "native-off": GPTGEN_NATIVE=0."""
    import os
    import subprocess
    import sys

    if not shutil.which("c++") and not shutil.which("g++"):
        pytest.skip("the native kernels need a C++ compiler")
    code = ("import torch\nfrom gptgen.config import GPTConfig\nfrom gptgen.model import GPT\n"
            "from gptgen.quantize import quantize_model\n"
            "for _ in range(2):\n"
            "    m = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))\n"
            f"    quantize_model(m, {mode!r}, compute_dtype=torch.float32)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, GPTGEN_CPU_FEATURES=mask.split()[0],
                                   **({"GPTGEN_NATIVE": "0"} if "native-off" in mask else {})))
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "quantize=" in line]
    if says is None:
        assert lines == []
    else:
        assert len(lines) == 1 and says in lines[0] and "instead" in lines[0], done.stderr
