import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("GPTGEN_DATA_DIR", REPO.parent / "shared" / "data"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Reference tests compare fp32 training with fp32 oracles: keep precision="auto" at fp32 on CPUs with
# bf16 units too (tests/test_cpu_speed_paths.py covers the auto choice itself).
os.environ.setdefault("GPTGEN_CPU_BF16", "0")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data directory {DATA_DIR} not found (set GPTGEN_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(data_dir) -> Path:
    return data_dir / "gpt2-tokenizer"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run many times faster on one thread, the more so on a shared 2-core machine.

    Use it module-wide with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
