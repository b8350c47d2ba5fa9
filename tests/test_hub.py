"""Pretrained models by name, through the Hugging Face Hub cache, proven without internet.

A loopback HTTP server stands in for the Hub: it answers HEAD/GET /{repo}/resolve/{revision}/{file} with
the headers huggingface_hub's own download code needs (X-Repo-Commit, ETag, Content-Length, X-Error-Code
on errors), so hf_hub_download runs for real: URL building, commit refs, blobs/snapshots cache layout,
.no_exist markers, offline fallback. The repos hold random tiny GPT-2s saved as real repos differ.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer, Tokenizer  # noqa: E402

import gptgen  # noqa: E402
from gptgen import hub  # noqa: E402
from gptgen.errors import CheckpointError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
REPO_ROOT = Path(__file__).resolve().parents[1]

ENGLISH = ["the quick brown fox jumps over the lazy dog.", "hello world, hello hub!",
           "a model by name, from the cache, offline."] * 20
KOREAN = ["안녕하세요 반갑습니다.", "오늘 날씨가 좋네요.", "저는 학생입니다.", "한국어 문장을 생성합니다."] * 20
KOGPT2_SPECIALS = ["<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<mask>"]  # KoGPT-2's ids 0..6


# The stand-in Hub --------------------------------------------------------------------------------
class FakeHub:
    def __init__(self):
        self.repos = {}  # repo -> {"refs": {rev: commit}, "commits": {commit: {file: bytes}}}
        self.gated = set()
        self.private = {}  # repo -> the token it needs
        self.requests = []  # (method, path)

    def add(self, repo, files, revision="main"):
        commit = hashlib.sha1(repr((repo, revision, sorted(files))).encode()).hexdigest()
        entry = self.repos.setdefault(repo, {"refs": {}, "commits": {}})
        entry["refs"][revision] = commit
        entry["commits"][commit] = files
        return commit

    def answer(self, method, raw_path, authorization=None):
        self.requests.append((method, raw_path))
        m = re.match(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", urlsplit(raw_path).path)
        if not m:
            return 404, {"X-Error-Code": "RepoNotFound"}, b""
        repo, rev, name = m["repo"], unquote(m["rev"]), unquote(m["file"])
        if repo in self.gated:
            return 403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access restricted"}, b""
        entry = self.repos.get(repo)
        if repo in self.private and authorization != f"Bearer {self.private[repo]}":
            entry = None
        if entry is None:  # the real Hub answers 401 for unknown repos to anonymous users
            return 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b""
        commit = entry["refs"].get(rev, rev if rev in entry["commits"] else None)
        if commit is None:
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b""
        data = entry["commits"][commit].get(name)
        if data is None:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, b""
        return 200, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                     "Content-Type": "application/octet-stream"}, data

    def gets(self):
        return [path for method, path in self.requests if method == "GET"]


def serve(fake):
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, body):
            status, headers, data = fake.answer(self.command, self.path, self.headers.get("Authorization"))
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self):
            self._reply(False)

        def do_GET(self):
            self._reply(True)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# Repos as real ones differ -----------------------------------------------------------------------
def tiny_gpt2(vocab_size, seed, **extra):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0, **extra)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


def config_bytes(model, **fields):
    data = model.config.to_dict()
    data.update(architectures=["GPT2LMHeadModel"], model_type="gpt2", **fields)
    return json.dumps(data).encode()


def safetensors_bytes(state, tmp):
    path = tmp / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path.read_bytes()


def bin_bytes(state, tmp):
    path = tmp / "w.bin"
    torch.save(state, path)
    return path.read_bytes()


def old_style_state(model):
    """openai-community/gpt2's layout: no `transformer.` prefix, causal-mask buffers, no lm_head."""
    n = model.config.n_positions
    state = {k[len("transformer."):]: v for k, v in model.state_dict().items() if k.startswith("transformer.")}
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n).float()
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


def byte_level_files(tmp):
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(ENGLISH, vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    out = tmp / "bbpe"
    out.mkdir()
    tok.save_model(str(out))
    tok.save(str(out / "tokenizer.json"))
    return {name: (out / name).read_bytes() for name in ("tokenizer.json", "vocab.json", "merges.txt")}


def kogpt2_files(tmp):
    tok = SentencePieceBPETokenizer()
    tok.train_from_iterator(KOREAN, vocab_size=200, special_tokens=KOGPT2_SPECIALS, show_progress=False)
    out = tmp / "spbpe"
    out.mkdir()
    tok.save_model(str(out))
    token = lambda t: {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {
        "vocab.json": (out / "vocab.json").read_bytes(), "merges.txt": (out / "merges.txt").read_bytes(),
        "special_tokens_map.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                               "pad_token": "<pad>", "mask_token": "<mask>"}).encode(),
        "tokenizer_config.json": json.dumps({
            "bos_token": token("<s>"), "eos_token": token("</s>"), "unk_token": token("<unk>"),
            "pad_token": token("<pad>"), "mask_token": token("<mask>"),
            "additional_special_tokens": ["<usr>", "<sys>"], "model_max_length": 64}).encode(),
    }


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repos")
    fake = FakeHub()
    bbpe = byte_level_files(tmp)
    vocab = len(json.loads(bbpe["vocab.json"]))
    models = {}

    # openai-community/gpt2 as it is: safetensors without prefix, buffers, no lm_head, tokenizer.json and
    # vocab/merges, plus files gptgen must not fetch. A tag v1 points at other weights.
    for rev, seed in (("main", 0), ("v1", 1)):
        model = tiny_gpt2(vocab, seed)
        files = {"config.json": config_bytes(model, n_ctx=64, activation_function="gelu_new",
                                             scale_attn_weights=True),
                 "model.safetensors": safetensors_bytes(old_style_state(model), tmp),
                 "tokenizer_config.json": b'{"model_max_length": 64}',
                 "pytorch_model.bin": b"must not be fetched", "tf_model.h5": b"no", "flax_model.msgpack": b"no",
                 "onnx/decoder_model.onnx": b"no", **bbpe}
        models["openai-community/gpt2", rev] = (model, fake.add("openai-community/gpt2", files, rev))

    # A .bin-only repo with `transformer.` keys and an explicit lm_head.weight, vocab.json + merges.txt only.
    model = tiny_gpt2(vocab, 2)
    state = dict(model.state_dict())
    fake.add("someone/gpt2-bin", {"config.json": config_bytes(model), "pytorch_model.bin": bin_bytes(state, tmp),
                                  "vocab.json": bbpe["vocab.json"], "merges.txt": bbpe["merges.txt"]})
    models["someone/gpt2-bin", "main"] = (model, None)

    # KoGPT-2's shape: `transformer.` keys without lm_head, SentencePiece-style BPE vocab.json + merges.txt,
    # special tokens declared in special_tokens_map.json and tokenizer_config.json.
    ko = kogpt2_files(tmp)
    model = tiny_gpt2(len(json.loads(ko["vocab.json"])), 3, pad_token_id=3)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    fake.add("skt/kogpt2-base-v2", {"config.json": config_bytes(model, n_ctx=64),
                                    "model.safetensors": safetensors_bytes(state, tmp), **ko})
    models["skt/kogpt2-base-v2", "main"] = (model, None)

    # Repos that must be refused.
    fake.add("facebook/opt-125m", {"config.json": json.dumps({"model_type": "opt",
                                                              "architectures": ["OPTForCausalLM"]}).encode()})
    fake.add("someone/no-weights", {"config.json": config_bytes(tiny_gpt2(vocab, 4)), **bbpe})
    fake.add("someone/gated", {"config.json": b"{}"})
    fake.gated.add("someone/gated")
    fake.add("someone/dataset-like", {"README.md": b"# not a model"})
    fake.add("someone/private", fake.repos["openai-community/gpt2"]["commits"][models["openai-community/gpt2", "main"][1]])
    fake.private["someone/private"] = "hf_test_token"

    server = serve(fake)
    fake.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    fake.models = models
    fake.tmp = tmp
    yield fake
    server.shutdown()


@pytest.fixture
def hub_env(fake_hub, tmp_path, monkeypatch):
    """Point huggingface_hub at the stand-in and a fresh cache (what HF_ENDPOINT / HF_HUB_CACHE do at import)."""
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        fake_hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.chdir(tmp_path)
    fake_hub.requests.clear()
    return fake_hub


def ids_for(vocab_size, seed=5):
    return torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(lm, hf_model):
    ids = ids_for(hf_model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), hf_model(ids).logits, atol=1e-4, rtol=0)


# Tests -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["openai-community/gpt2", "someone/gpt2-bin", "skt/kogpt2-base-v2"])
def test_names_load_with_transformers_logits(hub_env, name):
    lm = gptgen.load(name)
    directory = hub.resolve(name)
    assert directory.is_relative_to(Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}" / "snapshots")
    # transformers on the very files the hub library put in the cache, and on the weights it was made from
    assert_same_logits(lm, transformers.GPT2LMHeadModel.from_pretrained(directory).eval())
    assert_same_logits(lm, hub_env.models[name, "main"][0])
    # only the files gptgen needs were downloaded
    fetched = {unquote(re.sub(r"^/.+?/resolve/[^/]+/", "", p)) for p in hub_env.gets()}
    assert "config.json" in fetched
    assert not fetched & {"tf_model.h5", "flax_model.msgpack", "onnx/decoder_model.onnx"}
    assert ("pytorch_model.bin" in fetched) == (name == "someone/gpt2-bin")


def test_tokenizer_variants_match_hf_tokenizers(hub_env):
    gpt2 = gptgen.load("openai-community/gpt2").tokenizer
    assert not (hub.resolve("openai-community/gpt2") / "vocab.json").exists()  # tokenizer.json suffices
    oracle = Tokenizer.from_file(str(hub.resolve("openai-community/gpt2") / "tokenizer.json"))
    text = "hello world, the lazy fox jumps!<|endoftext|>"
    assert gpt2.encode(text) == oracle.encode(text).ids
    assert gpt2.eos_token == "<|endoftext|>" and gpt2.eos_token_id == oracle.token_to_id("<|endoftext|>")
    directory = hub.resolve("someone/gpt2-bin")
    pair = ByteLevelBPETokenizer.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
    pair.add_special_tokens(["<|endoftext|>"])
    assert gptgen.load("someone/gpt2-bin").tokenizer.encode(text) == pair.encode(text).ids == oracle.encode(text).ids

    ko = gptgen.load("skt/kogpt2-base-v2").tokenizer
    directory = hub.resolve("skt/kogpt2-base-v2")
    sp = SentencePieceBPETokenizer.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
    sp.add_special_tokens(KOGPT2_SPECIALS)
    for text in ("안녕하세요 반갑습니다.", "<usr> 오늘 날씨가 좋네요.</s><pad>", "저는 학생입니다.<mask>"):
        assert ko.encode(text) == sp.encode(text).ids, text
    assert [ko.bos_token, ko.eos_token, ko.pad_token, ko.unk_token, ko.special_tokens["mask"]] == \
           ["<s>", "</s>", "<pad>", "<unk>", "<mask>"]
    assert [ko.bos_token_id, ko.eos_token_id, ko.pad_token_id, ko.unk_token_id] == [0, 1, 3, 5]
    assert ko.decode(ko.encode("<usr> 저는 학생입니다."), skip_special_tokens=True).strip() == "저는 학생입니다."


def test_second_load_is_offline_and_makes_no_request(hub_env, monkeypatch):
    first = gptgen.load("skt/kogpt2-base-v2")
    assert hub_env.gets()
    hub_env.requests.clear()
    again = gptgen.load("skt/kogpt2-base-v2")  # online: one HEAD revalidates the branch, nothing is downloaded
    assert [method for method, _ in hub_env.requests] == ["HEAD"] and "config.json" in hub_env.requests[0][1]

    hub_env.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = gptgen.load("skt/kogpt2-base-v2")
    assert hub_env.requests == []
    ids = ids_for(first.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(first.model(ids), offline.model(ids)) and torch.equal(first.model(ids), again.model(ids))
    assert offline.tokenizer.encode("안녕하세요") == first.tokenizer.encode("안녕하세요")

    # unreachable Hub without HF_HUB_OFFLINE: the cache still serves
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    dead = "http://127.0.0.1:9"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    assert gptgen.load("skt/kogpt2-base-v2").tokenizer.bos_token == "<s>"


def test_revisions_and_keras_preset_names(hub_env):
    main = gptgen.load("openai-community/gpt2")
    tagged = gptgen.load("openai-community/gpt2@v1")
    assert_same_logits(tagged, hub_env.models["openai-community/gpt2", "v1"][0])
    assert_same_logits(gptgen.load("openai-community/gpt2", revision="v1"), hub_env.models["openai-community/gpt2", "v1"][0])
    commit = hub_env.models["openai-community/gpt2", "v1"][1]
    assert hub.resolve(f"openai-community/gpt2@{commit}").name == commit
    ids = ids_for(main.config.vocab_size)
    with torch.no_grad():
        assert not torch.allclose(main.model(ids), tagged.model(ids))
    # KerasHub's preset name is the same OpenAI checkpoint
    assert hub.resolve("gpt2_base_en") == hub.resolve("openai-community/gpt2")
    assert_same_logits(gptgen.load("gpt2_base_en"), hub_env.models["openai-community/gpt2", "main"][0])


def test_local_directory_wins(hub_env, tmp_path):
    local = gptgen.LanguageModel(gptgen.GPT(gptgen.preset("gpt2", vocab_size=300, n_layer=1, n_embd=16,
                                                          n_head=2, n_positions=32)),
                                 gptgen.load("openai-community/gpt2").tokenizer)
    local.save(tmp_path / "openai-community" / "gpt2")
    hub_env.requests.clear()
    assert gptgen.load("openai-community/gpt2").config.n_embd == 16
    assert hub_env.requests == []


def test_private_repo_needs_hf_token(hub_env, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert "HF_TOKEN" in error_of("someone/private")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert_same_logits(gptgen.load("someone/private"), hub_env.models["openai-community/gpt2", "main"][0])


def error_of(name, **kw):
    with pytest.raises(CheckpointError) as info:
        gptgen.load(name, **kw)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".")
    return message


def test_each_error_is_one_sentence(hub_env, monkeypatch):
    assert "OPTForCausalLM, which gptgen does not support" in error_of("facebook/opt-125m")
    assert "neither model.safetensors nor pytorch_model.bin" in error_of("someone/no-weights")
    assert "neither a local model directory nor a Hugging Face Hub repo" in error_of("nobody/nothing")
    assert "HF_TOKEN" in error_of("someone/gated") and "gated" in error_of("someone/gated")
    assert "has no revision 'nope'" in error_of("openai-community/gpt2@nope")
    assert "has no config.json" in error_of("someone/dataset-like")
    assert "does not exist" in error_of("./no/such/dir")
    Path("runs").mkdir()
    assert "Model directory runs/typo does not exist." == error_of("runs/typo")  # a local runs/ makes it a path
    assert "does not exist" in error_of("bad--name")  # the hub library's own repo-id validation
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_env.requests.clear()
    message = error_of("openai-community/gpt2")
    assert "HF_HUB_OFFLINE" in message and "gptgen download openai-community/gpt2" in message
    assert hub_env.requests == []


def test_cli_download_then_generate_offline_with_real_env(hub_env, tmp_path, monkeypatch, capsys):
    from gptgen.cli import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "home" / "hub"))  # what HF_HOME=home gives
    hub_env.requests.clear()
    assert main(["summary", "--model", "openai-community/gpt2"]) == 0  # a summary needs config.json only
    assert "Total params" in capsys.readouterr().out
    assert {path.rsplit("/", 1)[1] for path in hub_env.gets()} == {"config.json"}
    assert main(["download", "skt/kogpt2-base-v2"]) == 0
    assert str(tmp_path / "home" / "hub" / "models--skt--kogpt2-base-v2" / "snapshots") in capsys.readouterr().out
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["generate", "--model", "gpt2", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_HUB_OFFLINE" in err and "gptgen download gpt2" in err

    # The environment variables themselves, read by huggingface_hub at import, in a fresh process.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "HF_ENDPOINT": hub_env.endpoint,
           "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_CACHE", None)
    hub_env.requests.clear()
    out = subprocess.run([sys.executable, "-m", "gptgen", "generate", "--model", "skt/kogpt2-base-v2", "안녕하세요",
                          "--max-new-tokens", "3"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("안녕하세요")
    assert hub_env.requests == []


@pytest.mark.parametrize("fields", [
    dict(activation_function="gelu_python"), dict(activation_function="gelu_pytorch_tanh"),
    dict(reorder_and_upcast_attn=True, n_ctx=32), dict(tie_word_embeddings=False),
], ids=["gelu_python", "gelu_pytorch_tanh", "reorder-upcast-n_ctx", "untied"])
def test_config_fields_transformers_loads(tmp_path, fields):
    model = tiny_gpt2(97, 6, **fields)
    model.save_pretrained(tmp_path)
    ours = gptgen.checkpoint.load_model(tmp_path).eval()
    ids = ids_for(97)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), model(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fields, sentence", [
    (dict(scale_attn_weights=False), "scale_attn_weights=false are not supported"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=true are not supported"),
    (dict(activation_function="quick_gelu"), "activation_function 'quick_gelu' is not supported"),
    (dict(add_cross_attention=True), "add_cross_attention=true"),
])
def test_config_fields_that_change_the_maths_are_refused(tmp_path, fields, sentence):
    model = tiny_gpt2(97, 6, **fields)
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=sentence):
        gptgen.checkpoint.load_model(tmp_path)
