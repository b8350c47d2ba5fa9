"""Chat templates: a model directory's Jinja `chat_template` serves /v1/chat/completions with no flag, and the
prompt gptgen renders equals transformers' apply_chat_template on the same tokenizer directory (the oracle),
for ChatML, a Llama-2-style template, KoGPT-2's, Zephyr's, a multi-line Llama-3-style one (trim_blocks and
lstrip_blocks matter there), with system messages and with add_generation_prompt false."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("jinja2")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
transformers = pytest.importorskip("transformers")

from gptgen import GenerationError, LanguageModel, Tokenizer, load  # noqa: E402
from gptgen.chat import CHATML_SOURCE, TEMPLATES, ChatSession, get_template  # noqa: E402
from gptgen.serve import create_app  # noqa: E402
from gptgen.serve.protocol import ChatMessage  # noqa: E402
from serve_live import LiveServer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SPECIALS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}

LLAMA2_STYLE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set rest = messages[1:] %}{% else %}{% set system = false %}{% set rest = messages %}{% endif %}"
    "{% for message in rest %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system %}{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + "
    "message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
ZEPHYR_STYLE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
LLAMA3_STYLE = """{{ bos_token }}
{%- set ns = namespace(n=0) %}
{% for message in messages %}
    {% set ns.n = ns.n + 1 %}
    {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim }}
    {{- '<|eot_id|>' }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{% endif %}
"""

SYSTEM_CHAT = [{"role": "system", "content": "Be brief and kind."},
               {"role": "user", "content": "hello there"},
               {"role": "assistant", "content": "fine thanks"},
               {"role": "user", "content": "how are you {braces} 'quote' 왜요"}]
USER_ONLY = [{"role": "user", "content": "good morning"}]
ENDS_WITH_ASSISTANT = SYSTEM_CHAT[:3]
CASES = [  # (name, template source, messages, add_generation_prompt)
    ("chatml", CHATML_SOURCE, USER_ONLY, True),
    ("chatml-system", CHATML_SOURCE, SYSTEM_CHAT, True),
    ("chatml-no-generation-prompt", CHATML_SOURCE, ENDS_WITH_ASSISTANT, False),
    ("llama2-system", LLAMA2_STYLE, SYSTEM_CHAT, True),
    ("kogpt2", TEMPLATES["kogpt2"].source, SYSTEM_CHAT[1:], True),
    ("plain-system", TEMPLATES["plain"].source, SYSTEM_CHAT, True),
    ("zephyr-system", ZEPHYR_STYLE, SYSTEM_CHAT, True),
    ("llama3-multiline", LLAMA3_STYLE, SYSTEM_CHAT, True),
    ("llama3-no-generation-prompt", LLAMA3_STYLE, ENDS_WITH_ASSISTANT, False),
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    text = ["hello there how are you fine thanks good morning 왜요 {braces} 'quote' Be brief and kind."] * 4
    extra = ["<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    tok = Tokenizer.train("byte-bpe", text, 320, special_tokens=dict(SPECIALS),
                          reserved_tokens=list(SPECIALS.values()) + extra)
    lm = LanguageModel.from_preset("gpt2", tok, n_layer=1, n_embd=32, n_head=2, n_positions=256, init_std=0.2)
    return lm.save(tmp_path_factory.mktemp("chat-templates") / "model")


def _model_dir_with(base, tmp_path, source):
    target = tmp_path / "model"
    target.mkdir()
    for f in base.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    config = json.loads((target / "tokenizer_config.json").read_text("utf-8"))
    config["chat_template"] = source
    (target / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), "utf-8")
    return target


@pytest.mark.parametrize("name,source,messages,add_generation_prompt", CASES, ids=[c[0] for c in CASES])
def test_server_prompt_equals_transformers_apply_chat_template(base_dir, tmp_path, name, source, messages,
                                                               add_generation_prompt):
    directory = _model_dir_with(base_dir, tmp_path, source)
    oracle = transformers.AutoTokenizer.from_pretrained(directory)
    expected = oracle.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    lm = load(directory)
    app = create_app(lm, engine=_NoEngine(), served_model_name="m")  # no chat_template flag: the directory's
    state = app.state.gptgen
    got = state.chat_prompt([ChatMessage.model_validate(m) for m in messages],
                            add_generation_prompt=add_generation_prompt)
    assert got == expected
    # The same template through lm.chat's renderer and the named/file forms.
    assert get_template("auto", lm.tokenizer).apply(messages, add_generation_prompt) == expected
    jinja_file = tmp_path / "template.jinja"
    jinja_file.write_text(source, "utf-8")
    assert get_template(str(jinja_file), lm.tokenizer).apply(messages, add_generation_prompt) == expected


def test_chat_completions_serve_the_directory_template_with_no_flag(base_dir, tmp_path):
    directory = _model_dir_with(base_dir, tmp_path, CHATML_SOURCE)
    lm = load(directory)
    oracle = transformers.AutoTokenizer.from_pretrained(directory)
    app = create_app(lm, max_batch=2, served_model_name="m")
    with LiveServer(app) as live:
        for messages, agp in ((SYSTEM_CHAT, True), (ENDS_WITH_ASSISTANT, False)):
            body = {"model": "m", "messages": messages, "max_tokens": 3, "temperature": 0}
            if not agp:
                body["add_generation_prompt"] = False
            r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30)
            assert r.status_code == 200, r.text
            ids = oracle.apply_chat_template(messages, tokenize=True, add_generation_prompt=agp)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            assert r.json()["usage"]["prompt_tokens"] == len(ids)
        # A conversation that ends with the assistant needs add_generation_prompt false.
        r = httpx.post(live.url + "/v1/chat/completions",
                       json={"model": "m", "messages": ENDS_WITH_ASSISTANT, "max_tokens": 2}, timeout=30)
        assert r.status_code == 400 and "add_generation_prompt" in r.json()["error"]["message"]
    # The answer ends at ChatML's <|im_end|>, a special token: it is a stop token, not text.
    template = get_template("auto", lm.tokenizer)
    assert template.end_markers[0] == "<|im_end|>"


def test_a_template_saved_with_the_model_comes_back(base_dir, tmp_path):
    lm = load(base_dir)
    assert lm.tokenizer.chat_template is None
    lm.tokenizer.chat_template = CHATML_SOURCE
    again = load(lm.save(tmp_path / "saved"))
    assert again.tokenizer.chat_template == CHATML_SOURCE
    assert get_template("auto", again.tokenizer).apply(USER_ONLY).startswith("<|im_start|>user\ngood morning")


def test_plain_template_keeps_the_system_message_its_own_line():
    plain = get_template("plain")
    assert plain.apply([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello"}]) == \
        "be nice\nQ: hello\nA: "


def test_unknown_template_fails_at_start_up_naming_the_choices(base_dir):
    lm = load(base_dir)
    with pytest.raises(GenerationError, match="chatml"):
        create_app(lm, engine=_NoEngine(), chat_template="chatmlx")
    with pytest.raises(GenerationError, match="not valid Jinja"):
        get_template(_write(base_dir.parent / "bad.jinja", "{% for m in messages %}"), lm.tokenizer)


def test_cli_refuses_an_unknown_template_before_loading(capsys):
    from gptgen.cli import main

    assert main(["serve", "--model", "/nonexistent/model", "--chat-template", "chatmlx"]) == 2
    err = capsys.readouterr().err
    assert "--chat-template" in err and "chatml" in err and "Traceback" not in err


def test_lm_chat_and_session_use_the_same_template(base_dir):
    lm = load(base_dir)
    messages = [{"role": "system", "content": "Be brief and kind."}, {"role": "user", "content": "hello"}]
    answer = lm.chat(messages, template="chatml", sampler="greedy", max_new_tokens=4)
    prompt = get_template("chatml", lm.tokenizer).apply(messages)
    direct = lm.generate(prompt, sampler="greedy", max_new_tokens=4, include_prompt=False,
                         eos_token_id=sorted({lm.tokenizer.token_to_id("<|im_end|>"), lm.tokenizer.eos_token_id}),
                         stop=[], skip_special_tokens=True)
    assert answer == direct
    session = ChatSession(lm, template="chatml", system="Be brief and kind.", options=dict(max_new_tokens=4))
    session.ask("hello")
    assert session.last_prompt == prompt


def _write(path, text):
    path.write_text(text, "utf-8")
    return str(path)


class _NoEngine:
    """Stands in for the batch engine where a test only renders prompts."""

    max_context = None
    compile_cpu = False

    def stats(self):
        return {}


def test_fine_tuning_on_question_answer_pairs_saves_the_chat_template(tmp_path):
    import gptgen

    rows = tmp_path / "pairs.csv"
    rows.write_text("Q,A\n" + "".join(f"hello {i},fine thanks {i}\n" for i in range(40)), "utf-8")
    run = gptgen.train(data=[rows], reader="csv", template="<s>{Q}</s><s>{A}</s>", preset="mini",
                       config=dict(n_layer=1, n_embd=16, n_head=2, n_positions=32), train_tokenizer="bpe",
                       vocab_size=120, reserved_tokens=list(SPECIALS.values()), seq_len=16, batch_size=8,
                       max_steps=1, threads=1, progress=False, samples=False, output_dir=tmp_path / "run",
                       print_fn=None)
    saved = load(run.model_dir)
    template = get_template("auto", saved.tokenizer)  # no flag: the directory's own chat_template
    assert template.apply(USER_ONLY) == "<s>good morning</s><s>"
    assert json.loads((run.model_dir / "tokenizer_config.json").read_text("utf-8"))["chat_template"] == \
        TEMPLATES["kogpt2"].source
