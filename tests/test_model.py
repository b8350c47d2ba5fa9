import pytest
import torch

from gptgen import GPT, ConfigError, GPTConfig, preset
from gptgen.summary import summary_rows


def meta_model(name, **kw):
    with torch.device("meta"):
        return GPT(preset(name, **kw))


@pytest.mark.parametrize("name,expected", [
    ("mini", 3_255_938), ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
    ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200),
])
def test_preset_parameter_counts(name, expected):
    assert meta_model(name).num_parameters() == expected


def test_mini_matches_kerashub_layer_breakdown():
    rows = {name.split(" ")[0]: count for name, _, count in summary_rows(meta_model("mini"))}
    assert rows == {"embedding": 1_312_768, "decoder_0": 329_085, "decoder_1": 329_085, "lm_head": 1_285_000}
    cfg = preset("mini")
    assert (cfg.attn_head_dim, cfg.attn_inner_dim) == (85, 255)


def test_presets_are_overridable_and_validated():
    cfg = preset("gpt2", n_layer=2, vocab_size=1000)
    assert (cfg.n_layer, cfg.vocab_size, cfg.n_embd) == (2, 1000, 768)
    with pytest.raises(ConfigError, match="Unknown preset"):
        preset("gpt5")
    with pytest.raises(ConfigError, match="n_layer"):
        GPTConfig(n_layer=0)
    with pytest.raises(ConfigError, match="activation"):
        GPTConfig(activation="swish")


def small_configs():
    return [
        preset("mini", vocab_size=97, n_positions=40),
        preset("gpt2", vocab_size=97, n_positions=40, n_embd=48, n_layer=2, n_head=4),
        GPTConfig(vocab_size=97, n_positions=40, n_embd=30, n_layer=3, n_head=4, head_dim=7, n_inner=50,
                  activation="gelu", tie_word_embeddings=False),
    ]


@pytest.mark.parametrize("cfg", small_configs(), ids=["mini", "gpt2", "odd-heads"])
def test_cached_decoding_matches_full_forward(cfg):
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (3, 25))
    with torch.no_grad():
        full = model(x)
        model.setup_kv_cache(3, 40)
        steps = [model(x[:, :9], input_pos=torch.arange(9))]
        for t in range(9, 25):
            steps.append(model(x[:, t:t + 1], input_pos=torch.tensor([t]), kv_len=t + 1))
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", small_configs(), ids=["mini", "gpt2", "odd-heads"])
def test_left_padding_mask_gives_unpadded_logits(cfg):
    torch.manual_seed(1)
    model = GPT(cfg).eval()
    real = torch.randint(1, cfg.vocab_size, (1, 12))
    pad = 4
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), real], 1)
    mask = torch.cat([torch.zeros(1, pad), torch.ones(1, 12)], 1).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(real)
        got = model(padded, attention_mask=mask, position_ids=positions)
        assert torch.isfinite(got).all()
        # Same through the cache: prefill the padded prompt, then decode one token.
        model.setup_kv_cache(1, 20)
        key_mask = torch.cat([mask, torch.ones(1, 4, dtype=torch.long)], 1)
        pre = model(padded, input_pos=torch.arange(16), position_ids=positions, attention_mask=key_mask)
        nxt = torch.randint(1, cfg.vocab_size, (1, 1))
        step = model(nxt, input_pos=torch.tensor([16]), position_ids=torch.tensor([[12]]), attention_mask=key_mask)
        model.clear_kv_cache()
        reference = model(torch.cat([real, nxt], 1))
    torch.testing.assert_close(got[:, pad:], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pre[:, pad:], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[:, -1], reference[:, -1], atol=1e-5, rtol=1e-5)


def test_tied_head_shares_storage_and_untied_does_not():
    tied = GPT(preset("gpt2", vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    assert tied.lm_head.weight.data_ptr() == tied.embed.wte.weight.data_ptr()
    untied = GPT(preset("mini", vocab_size=50, n_positions=16))
    assert untied.lm_head.weight.data_ptr() != untied.embed.wte.weight.data_ptr()
    assert untied.lm_head.bias is not None and tied.lm_head.bias is None


def test_post_norm_block_normalises_its_output():
    torch.manual_seed(0)
    model = GPT(preset("mini", vocab_size=50, n_positions=16)).eval()
    out = {}
    model.blocks[0].register_forward_hook(lambda m, i, o: out.setdefault("y", o))
    model(torch.randint(0, 50, (2, 10)))
    y = out["y"]  # LayerNorm output with unit weight, zero bias: zero mean, unit variance per position
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 10), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(2, 10), atol=1e-3, rtol=0)


def test_return_hidden_and_last_token_only():
    torch.manual_seed(0)
    model = GPT(preset("gpt2", vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    x = torch.randint(0, 50, (2, 7))
    logits, hidden = model(x, return_hidden=True)
    assert hidden.shape == (2, 7, 16)
    torch.testing.assert_close(model(x, last_token_only=True), logits[:, -1:])
