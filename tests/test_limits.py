"""gptgen.limits: the machine's memory, and sizes refused before they are allocated."""

from pathlib import Path

import pytest
import torch

from gptgen import limits
from gptgen.config import GPTConfig
from gptgen.errors import ConfigError, GenerationError
from gptgen.model import GPT


def _meminfo_available():
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def test_available_memory_is_positive_and_at_most_what_the_kernel_reports(monkeypatch):
    monkeypatch.delenv("GPTGEN_MEMORY_LIMIT", raising=False)
    free = limits.available_memory()
    assert free > 0
    kernel = _meminfo_available() if Path("/proc/meminfo").exists() else None
    if kernel is not None:  # another process may free or take memory between the two reads
        assert free <= kernel * 1.25


def test_the_environment_caps_available_memory(monkeypatch):
    monkeypatch.setenv("GPTGEN_MEMORY_LIMIT", "64M")
    assert limits.available_memory() == 64 << 20
    monkeypatch.setenv("GPTGEN_MEMORY_LIMIT", "1.5G")
    assert limits.available_memory() == int(1.5 * (1 << 30))
    monkeypatch.setenv("GPTGEN_MEMORY_LIMIT", "lots")
    with pytest.raises(ConfigError, match="GPTGEN_MEMORY_LIMIT"):
        limits.available_memory()


def test_check_allocation_names_the_option_and_the_limit(monkeypatch):
    monkeypatch.setenv("GPTGEN_MEMORY_LIMIT", "100M")
    limits.check_allocation("--batch-size", 49 << 20, value=4)  # under half: allowed
    with pytest.raises(ConfigError) as info:
        limits.check_allocation("--batch-size", 51 << 20, value=4096)
    message = str(info.value)
    assert message.startswith("--batch-size=4,096 would need about 53.5 MB")
    assert "52.4 MB" in message and "lower --batch-size" in message
    assert message.count(".") <= 6 and "\n" not in message
    with pytest.raises(GenerationError, match="num_beams"):
        limits.check_allocation("num_beams", 1 << 40, error=GenerationError)


def test_kv_cache_bytes_matches_the_model_s_buffers():
    config = GPTConfig(vocab_size=50, n_positions=32, n_embd=24, n_layer=3, n_head=4)
    model = GPT(config)
    for dtype in (torch.float32, torch.bfloat16):
        model.setup_kv_cache(5, 17, dtype=dtype)
        allocated = sum(c.k_cache.nbytes + c.v_cache.nbytes for c in model.kv_caches())
        assert limits.kv_cache_bytes(config, 5, 17, dtype) == allocated
        model.clear_kv_cache()
    assert limits.kv_cache_bytes(config, 5, 17, "fp16") == limits.kv_cache_bytes(config, 5, 17, torch.float16)
    # KerasHub's 3 heads of 85 dims on a 256-wide model: the cache holds 255 per position, not 256
    keras = GPTConfig(vocab_size=50, n_positions=8, n_embd=256, n_layer=1, n_head=3, head_dim=85)
    assert limits.kv_cache_bytes(keras, 1, 1, 4) == 2 * 3 * 85 * 4


def test_activation_estimate_bounds_a_real_training_step():
    """The estimate is an upper bound of the peak memory a training step takes (measured on CPU)."""
    config = GPTConfig(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    model = GPT(config)
    idx = torch.randint(0, 300, (8, 64))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(idx)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, 300), idx.view(-1))
    assert sum(saved) < limits.activation_bytes(config, 8, 64)
    loss.backward()
