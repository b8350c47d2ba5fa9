"""A training run the FSDP tests start under torchrun (and run in one process as the reference).

python fsdp_worker.py OUTPUT_DIR JSON_OPTIONS  — trains the tiny model of build() with fit(**options);
env KILL_AT_STEP=N: rank 0 kills its own process group with SIGKILL after step N (a kill -9 mid-run).
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

from gptgen import LanguageModel, Tokenizer
from gptgen.data import pack_examples
from gptgen.training import Callback, fit

TINY = dict(n_layer=2, n_embd=32, n_head=2, n_inner=64, n_positions=32, vocab_size=128)
OPTIONS = dict(batch_size=8, max_steps=20, lr=3e-3, precision="fp32", device="cpu", progress=False, seed=1,
               eval_each_epoch=False, schedule="cosine", warmup_steps=2, grad_clip=1.0, weight_decay=0.1)


def build(seed: int = 0):
    texts = [f"the {w} sat on the {v} and it was {u}" for w in ("cat", "dog", "bird", "fish")
             for v in ("mat", "log", "tree", "rock") for u in ("good", "bad", "odd")]
    tok = Tokenizer.train("wordpiece", texts, 120, lowercase=True, min_frequency=1,
                          reserved_tokens=["[PAD]", "[UNK]", "[BOS]"])
    torch.manual_seed(seed)
    lm = LanguageModel.from_preset("gpt2", tok, **TINY)
    g = torch.Generator().manual_seed(seed)
    lists = [torch.randint(3, 120, (int(torch.randint(4, 26, (1,), generator=g)),), generator=g).tolist()
             for _ in range(64)]
    return lm, pack_examples(lists, 24, bos_id=2, pad_id=0)


class _Kill(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, logs) -> None:
        if trainer.step == self.step and trainer.is_main:
            os.killpg(os.getpgid(0), signal.SIGKILL)


def main() -> None:
    torch.set_num_threads(1)
    out, options = sys.argv[1], json.loads(sys.argv[2])
    lm, data = build()
    kill = int(os.environ.get("KILL_AT_STEP", "0"))
    result = fit(lm, data, output_dir=out, callbacks=[_Kill(kill)] if kill else [], **{**OPTIONS, **options})
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out.rstrip("/") + ".final.pt", "wb") as f:
            torch.save({k: v.detach().clone() for k, v in lm.model.state_dict().items()}, f)
        print(json.dumps({"steps": result.steps}))


if __name__ == "__main__":
    main()
