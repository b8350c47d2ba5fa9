"""The training pipeline as one call: corpus -> tokenizer -> model -> Trainer.

    import gptgen
    run = gptgen.train(recipe="keras-mini", output_dir="runs/mini")            # a named recipe
    run = gptgen.train(data="notes/*.txt", reader="paragraphs", split="every_nth:10", preset="mini",
                       train_tokenizer="wordpiece", vocab_size=4000, epochs=3, output_dir="runs/notes")
    run = gptgen.train(model="gpt2", data="style.txt", lr=5e-5, max_steps=500)  # fine-tune a model
    run.lm.generate("The", max_new_tokens=40)

`gptgen train`, `gptgen finetune` and `gptgen quickstart` call this function, so the same settings and seed
give the same run from Python and from the command line. Every option is checked before any work.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ConfigError, GenerationError, TrainingError
from .options import check_device, check_minutes, check_output_dir, check_positive_int, check_seed, check_threads
from .recipes import recipe_settings
from .training.rundir import check_run_dir

# Settings of the pipeline itself; the options of the Trainer (gptgen.training.TrainConfig: epochs, batch_size,
# lr, schedule, weight_decay, eps, betas, grad_clip, precision, device, seed, ...) are accepted beside them.
DEFAULTS: dict[str, Any] = dict(
    # the model: a new one of a preset (with `config` overrides), or a trained one to fine-tune
    preset=None, config=None, model=None,
    # the tokenizer: a directory/file/Tokenizer, or one trained on the training texts
    tokenizer=None, train_tokenizer=None, vocab_size=8000, lowercase=False, reserved_tokens=None,
    # the corpus (gptgen.data.read_corpus) and its packing
    data=None, dataset=None, val_data=None, data_root=None, reader=None, field=None, template=None, split=None,
    min_length=None, limit=None, seq_len=None, packing="pad", add_bos=None, add_eos=False,
    # CPU threads per process (default: the cores divided among the processes of this machine)
    threads=None,
    # a text sample at each epoch end
    samples=True, sample_prompt="", sample_tokens=80, sampler="top_k", top_k=10,
)
# Trainer options the pipeline sets itself.
_OWN_TRAIN_FIELDS = {"output_dir", "num_threads", "seq_len", "add_bos", "add_eos"}


def _train_fields() -> set[str]:
    from .training.trainer import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)} - _OWN_TRAIN_FIELDS


def resolve_settings(recipe: str | None = None, **given: Any) -> dict[str, Any]:
    """The settings of a run: the defaults, then the recipe's, then those given (None = not given)."""
    known = set(DEFAULTS) | _train_fields()
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"Unknown training setting(s): {', '.join(unknown)}; see gptgen.pipeline.DEFAULTS and "
                          "gptgen.training.TrainConfig.")
    given = {k: v for k, v in given.items() if v is not None}
    settings = {**DEFAULTS, **recipe_settings(recipe)}
    if "data" in given:  # a recipe's data set applies only when no files are given
        settings["dataset"] = None
    if "tokenizer" in given or "model" in given:  # a given tokenizer or model replaces a trained one
        settings["train_tokenizer"] = None
    if "model" in given:
        settings["preset"] = None
    settings.update(given)
    settings["recipe"] = recipe
    return settings


def _check(s: dict[str, Any]) -> None:
    """Everything that can be checked without reading data or building a model."""
    if s["model"] is None and s["preset"] is None:
        raise ConfigError("Say which model to train: preset=NAME (--preset mini, gpt2, ...) for a new one, "
                          "model=DIR (gptgen finetune --model DIR) for a trained one, or a recipe.")
    if s["model"] is not None and s["preset"] is not None:
        raise ConfigError("Give either preset= (a new model) or model= (a trained one), not both.")
    if s["model"] is None and s["tokenizer"] is None and s["train_tokenizer"] is None:
        raise ConfigError("Give a tokenizer (--tokenizer DIR), or train_tokenizer=KIND (--train-tokenizer KIND) "
                          "to train one on the training data.")
    if s["data"] is None and s["dataset"] is None:
        raise ConfigError("Say what to train on: data=PATHS (--data PATH..., files, directories, globs) or "
                          "dataset=NAME (--dataset NAME).")
    if s["train_tokenizer"] is not None:
        from .tokenizer import KINDS

        if s["train_tokenizer"] not in KINDS:
            raise ConfigError(f"Unknown tokenizer kind {s['train_tokenizer']!r}; choose one of {', '.join(KINDS)}.")
        check_positive_int(s["vocab_size"], "vocab_size (--vocab-size)")
    check_positive_int(s["seq_len"], "seq_len (--seq-len)")
    check_positive_int(s["limit"], "limit")
    if s["packing"] not in ("pad", "chunk"):
        raise ConfigError(f"Unknown packing {s['packing']!r}; choose pad or chunk.")
    if s["min_length"] is not None and (isinstance(s["min_length"], bool) or not isinstance(s["min_length"], int)
                                        or s["min_length"] < 0):
        raise ConfigError(f"min_length (--min-length) must be 0 or more characters, got {s['min_length']!r}.")
    if s["grad_accum"] > s["batch_size"]:
        raise ConfigError(f"grad_accum (--grad-accum) {s['grad_accum']} is more than batch_size (--batch-size) "
                          f"{s['batch_size']}; each micro-batch needs at least one example.")
    check_threads(s["threads"])
    check_seed(s["seed"])
    check_minutes(s["max_time"])
    check_device(s["device"])
    if s["samples"]:
        check_positive_int(s["sample_tokens"], "sample_tokens (--sample-tokens)", allow_none=False)
        from .generation import resolve_sampler

        try:  # the sampler of the epoch-end samples, built now rather than failing after an epoch
            resolve_sampler(s["sampler"], top_k=s["top_k"] if s["sampler"] == "top_k" else None)
        except TypeError as exc:
            raise GenerationError(f"Bad sampler options: {exc}.") from None


def _train_config(s: dict[str, Any], output_dir: Path | None):
    from .training.trainer import TrainConfig

    options = {k: s[k] for k in _train_fields() if k in s}
    return TrainConfig.from_options({**options, "output_dir": str(output_dir) if output_dir else None})


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass
class Run:
    """What gptgen.train returns: the trained model, the Trainer's result and the run's numbers."""

    lm: Any  # LanguageModel
    result: Any  # gptgen.training.FitResult
    settings: dict[str, Any]
    output_dir: Path | None = None
    train_examples: int = 0
    val_examples: int = 0
    seq_len: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    is_main: bool = True  # False on the other processes of a torchrun launch

    @property
    def steps(self) -> int:
        return self.result.steps

    @property
    def val(self) -> dict[str, float] | None:
        return self.result.val

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.result.history

    @property
    def best_dir(self) -> Path | None:
        return self.result.best_dir

    @property
    def last_dir(self) -> Path | None:
        return self.result.last_dir

    @property
    def model_dir(self) -> Path | None:
        """The best model's directory, else the last checkpoint's (None without an output directory)."""
        return self.result.best_dir or self.result.last_dir

    def step_losses(self) -> list[float]:
        """The training loss of every optimizer step, in order."""
        return [r["loss"] for r in self.result.history if r.get("event") == "step"]

    def summary(self) -> dict[str, Any]:
        r = self.result
        return {"steps": r.steps, "epochs": r.epochs, "stopped": r.stopped, "val": r.val, "train": r.train,
                **{k: round(v, 3) for k, v in self.timings.items()},
                "output": str(self.output_dir) if self.output_dir else None,
                "last": str(r.last_dir) if r.last_dir else None,
                "best": str(r.best_dir.resolve()) if r.best_dir else None,
                "curves": str(r.curves_path) if r.curves_path else None}


def _tokenizer(s, corpus, output_dir: Path | None, env, say, timings):
    """The given tokenizer, the one of the run being resumed, or one trained here (rank 0, shared by file)."""
    from .tokenizer import Tokenizer
    from .training import distributed as D

    if s["tokenizer"] is not None:
        return s["tokenizer"] if isinstance(s["tokenizer"], Tokenizer) else Tokenizer.from_pretrained(s["tokenizer"])
    if s["resume"] and output_dir is not None and (output_dir / "last" / "tokenizer.json").is_file():
        return Tokenizer.from_pretrained(output_dir / "last")
    tok_dir = output_dir / "tokenizer" if output_dir is not None else None
    if env.enabled and tok_dir is None:
        raise TrainingError("Distributed training with a trained tokenizer (--train-tokenizer) needs an output "
                            "directory (--output).")
    tok = None
    if env.is_main:
        t0 = time.perf_counter()
        tok = Tokenizer.train(s["train_tokenizer"], corpus.train, s["vocab_size"], lowercase=bool(s["lowercase"]),
                              reserved_tokens=list(s["reserved_tokens"]) if s["reserved_tokens"] else None)
        timings["tokenizer_s"] = time.perf_counter() - t0
        say(f"Trained a {s['train_tokenizer']} tokenizer of {tok.vocab_size:,} tokens in "
            f"{timings['tokenizer_s']:.1f} s.")
        if tok_dir is not None:
            from .written import record

            tok.save(tok_dir)
            record(output_dir, ["tokenizer"])
    if env.enabled:
        D.barrier(env)
        if not env.is_main:
            tok = Tokenizer.from_pretrained(tok_dir)
    return tok


def _model(s, tok):
    """A new model of the preset (seeded) or the trained model to fine-tune."""
    import torch

    from .config import parse_overrides
    from .lm import LanguageModel, load

    if s["model"] is not None:
        lm = s["model"] if isinstance(s["model"], LanguageModel) else load(s["model"], tokenizer=s["tokenizer"])
        torch.manual_seed(s["seed"])  # dropout draws from the global generator
        return lm
    config = s["config"] or {}
    if not isinstance(config, dict):
        config = parse_overrides(list(config))
    torch.manual_seed(s["seed"])
    try:
        from .config import preset
        from .options import check_model_memory

        shards = int(os.environ.get("WORLD_SIZE", "1") or 1) if s.get("fsdp") else 1
        check_model_memory(preset(s["preset"], **{**config, "vocab_size": tok.vocab_size}), training=True,
                           shards=shards)  # weights, gradients and AdamW's state, before any is allocated
        return LanguageModel.from_preset(s["preset"], tok, **config)
    except TypeError as exc:
        raise ConfigError(f"Bad model config override: {exc}.") from None


def _keep_chat_template(lm, s) -> None:
    """Training on question/answer pairs (a format like "<s>{Q}</s><s>{A}</s>"): the model directory keeps that
    turn format as its chat_template, so `gptgen serve` and `gptgen chat` use it with no flag."""
    from .chat import template_from_pair_format

    fmt = s.get("template")
    if fmt is None and s.get("dataset"):
        from .data.registry import get_spec

        fmt = get_spec(s["dataset"]).options.get("template")
    template = template_from_pair_format(fmt)
    if template is not None and not getattr(lm.tokenizer, "chat_template", None):
        lm.tokenizer.chat_template = template.source


def packing_for(lm, seq_len: int | None, add_bos: bool | None, packing: str = "pad", new_model: bool = False):
    """The example length and BOS choice for lm: seq_len within its context; BOS as the model was trained
    (a new model: with pad packing, when the tokenizer has one)."""
    ctx = lm.config.n_positions
    if seq_len and seq_len > ctx:
        raise TrainingError(f"--seq-len {seq_len} is longer than the model's context of {ctx} positions; use "
                            f"--seq-len {ctx} or less, or a model with a longer context.")
    if add_bos is None:
        if new_model:
            add_bos = packing == "pad" and lm.tokenizer.bos_token_id is not None
        else:
            add_bos = bool(lm.config.extra.get("add_bos", False))
    return seq_len or ctx, add_bos


def _check_batch_sizes(lm, s, seq_len: int, train_texts: int, val_texts: int) -> None:
    """Refuse a batch that would not fit in memory before the corpus is tokenised (texts bound the rows of a
    pad-packed batch; chunk packing may give more rows than texts, so it is not capped)."""
    from .options import check_batch_memory

    cap = s["packing"] == "pad"
    check_batch_memory(lm.config, s["batch_size"], seq_len, examples=train_texts if cap else None,
                       grad_accum=s["grad_accum"])
    if s.get("eval_batch_size") and val_texts:
        check_batch_memory(lm.config, s["eval_batch_size"], seq_len, examples=val_texts if cap else None,
                           option="eval_batch_size (--eval-batch-size)", training=False)


def train(recipe: str | None = None, *, data=None, val_data=None, dataset: str | None = None, tokenizer=None,
          preset: str | None = None, model=None, output_dir: str | os.PathLike | None = None,
          callbacks: Sequence[Any] = (), print_fn: Callable[[str], None] | None = print, **settings: Any) -> Run:
    """Run a recipe (or the settings given) from corpus to trained model; return a Run.

    recipe: a name of gptgen.recipes.RECIPES ("keras-mini", "quickstart"), whose settings the others override.
    data / val_data: text files, directories or globs (read with `reader`: lines, paragraphs, documents, json,
      jsonl, csv); or dataset: a named data set (gptgen.data.DATASETS). split, min_length, limit: see
      gptgen.data.read_corpus.
    preset (+ config={field: value}) with tokenizer= or train_tokenizer=KIND (vocab_size, lowercase,
      reserved_tokens): a new model; or model: a trained model directory (or Hub name) to fine-tune.
    seq_len, packing ("pad" | "chunk"), add_bos, add_eos: how texts become examples.
    output_dir: checkpoints, metrics.jsonl, curves.png, best/ (and tokenizer/ when one is trained).
    The Trainer's options (gptgen.training.TrainConfig) are taken by name: epochs, max_steps, max_time,
    batch_size, lr, schedule, weight_decay, eps, betas, grad_clip, precision, device, seed, resume, overwrite, ...
    samples, sample_prompt, sample_tokens, sampler, top_k: the text sample printed at each epoch end.
    print_fn: where progress lines go (None: silent).
    """
    s = resolve_settings(recipe, data=data, val_data=val_data, dataset=dataset, tokenizer=tokenizer, preset=preset,
                         model=model, **settings)
    # Every check before any work: the Trainer's options first, then the pipeline's.
    output = check_output_dir(output_dir, "the output directory (--output)")
    config = _train_config(s, output)
    s.update({k: getattr(config, k) for k in _train_fields()})
    _check(s)
    if output is not None:  # an earlier run or a running one in the output directory: refuse before any work
        check_run_dir(output, config.resume, config.overwrite)
        if s["model"] is None and s["tokenizer"] is None and (output / "tokenizer").exists():
            from .written import wrote

            if not wrote(output, "tokenizer"):  # the trained tokenizer goes there: never over the user's
                raise ConfigError(f"{output / 'tokenizer'} is not a tokenizer gptgen wrote, so the trained tokenizer "
                                  "does not replace it; move it away or choose another output directory.")

    import torch

    from .data.corpus import read_corpus
    from .training import PrintEpochs, SampleText, fit
    from .training import distributed as D

    device = s["device"]
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    env = D.init_distributed("cuda" if cuda else "cpu")
    say = print_fn if (print_fn is not None and env.is_main) else (lambda line: None)
    timings: dict[str, float] = {}
    try:
        threads = s["threads"] or max(1, _cores() // max(1, env.local_world_size))
        torch.set_num_threads(threads)
        corpus = read_corpus(s["data"], dataset=s["dataset"], val_data=s["val_data"], reader=s["reader"],
                             split=s["split"], min_length=s["min_length"], seed=s["seed"], root=s["data_root"],
                             field=s["field"], template=s["template"]).limit(s["limit"])
        say(f"Corpus: {corpus.source}, {len(corpus.train):,} training and {len(corpus.val or []):,} validation "
            f"texts; {threads} CPU thread(s).")
        tok = _tokenizer(s, corpus, output, env, say, timings) if s["model"] is None else None
        lm = _model(s, tok)
        _keep_chat_template(lm, s)
        seq_len, add_bos = packing_for(lm, s["seq_len"], s["add_bos"], s["packing"], new_model=s["model"] is None)
        if add_bos and s["packing"] == "pad":
            lm.config.extra["add_bos"] = True  # generation then starts from BOS, as the model was trained
        _check_batch_sizes(lm, s, seq_len, len(corpus.train), len(corpus.val or []))
        if s["model"] is not None:
            say(_memory_line(lm.config, s, seq_len, env.world_size))
        t0 = time.perf_counter()
        packed = corpus.pack(lm.tokenizer, seq_len, s["packing"], add_bos, bool(s["add_eos"]))
        timings["tokenize_s"] = time.perf_counter() - t0
        what = f"the {s['preset']} preset" if s["model"] is None else str(s["model"])
        say(f"Model: {what}, {lm.num_parameters():,} parameters; {len(packed.train):,} training and "
            f"{len(packed.val) if packed.val is not None else 0:,} validation examples of {seq_len} tokens.")
        cbs = [] if print_fn is None else [PrintEpochs(print_fn)]
        if s["samples"]:
            cbs.append(SampleText(prompt=s["sample_prompt"], max_new_tokens=s["sample_tokens"], sampler=s["sampler"],
                                  top_k=s["top_k"], seed=s["seed"], print_fn=print_fn))
        result = fit(lm, packed.train, packed.val, callbacks=[*cbs, *callbacks], **dataclasses.asdict(config))
        timings["fit_s"] = result.elapsed
    finally:
        D.shutdown(env)
    return Run(lm, result, s, output, len(packed.train), len(packed.val) if packed.val is not None else 0, seq_len,
               timings, env.is_main)


def memory_table(**options) -> str:
    """The memory each fine-tuning mode needs for GPT-2 small to XL (gptgen.training.memory.memory_table)."""
    from .training.memory import memory_table as table

    return table(**options)


def _memory_line(config, s, seq_len: int, devices: int) -> str:
    """The memory a fine-tune needs per device (gptgen.training.memory), and what the other modes would need."""
    from .training.memory import GiB, estimate_memory

    common = dict(batch_size=s.get("batch_size") or 32, seq_len=seq_len, grad_accum=s.get("grad_accum") or 1,
                  devices=devices, lora_target=s.get("lora_target"),
                  gradient_checkpointing=bool(s.get("gradient_checkpointing")))
    mode = "fsdp" if s.get("fsdp") and devices > 1 else "lora" if s.get("lora_rank") else "full"
    chosen = estimate_memory(config, mode, lora_rank=s.get("lora_rank"), **common)
    others = [estimate_memory(config, m, lora_rank=s.get("lora_rank") or 8, **common)
              for m in ("full", "lora") if m != mode]
    return (f"Memory estimate, {common['batch_size']} x {seq_len} tokens: {chosen.describe()}; "
            + ", ".join(f"{e.mode} would need ~{e.total / GiB:.1f} GiB" for e in others) + " (see docs/training.md).")


def evaluate_corpus(model, *, tokenizer=None, data=None, val_data=None, dataset: str | None = None, reader: str | None = None,
             field: str | None = None, template: str | None = None, split=None, min_length: int | None = None,
             data_root=None, seq_len: int | None = None, packing: str | None = "pad", add_bos: bool | None = None,
             add_eos: bool | None = False, batch_size: int = 32, device: str | None = None, precision: str = "fp32",
             threads: int | None = None) -> dict[str, float]:
    """Loss, perplexity and token accuracy of a model (directory, Hub name or LanguageModel) on a corpus:
    its validation part when it has one (val_data or split), else all of it. Adds "examples"."""
    packing = packing or "pad"
    check_positive_int(batch_size, "batch_size (--batch-size)", allow_none=False)
    check_positive_int(seq_len, "seq_len (--seq-len)")
    check_threads(threads)
    check_device(device)
    if data is None and dataset is None:
        raise ConfigError("Say what to evaluate on: data=PATHS (--data PATH...) or dataset=NAME (--dataset NAME).")
    if packing not in ("pad", "chunk"):
        raise ConfigError(f"Unknown packing {packing!r}; choose pad or chunk.")
    import torch

    from .data.corpus import read_corpus
    from .lm import LanguageModel, load

    if threads:
        torch.set_num_threads(threads)
    lm = model if isinstance(model, LanguageModel) else load(model, tokenizer=tokenizer)
    corpus = read_corpus(data, dataset=dataset, val_data=val_data, reader=reader, split=split, min_length=min_length,
                         root=data_root, field=field, template=template)
    texts = corpus.val if corpus.val is not None else corpus.train
    seq_len, add_bos = packing_for(lm, seq_len, add_bos, packing)
    from .options import check_batch_memory

    check_batch_memory(lm.config, batch_size, seq_len, examples=len(texts) if packing == "pad" else None,
                       training=False)
    from .data.corpus import Corpus

    examples = Corpus(texts).pack(lm.tokenizer, seq_len, packing, add_bos, bool(add_eos)).train
    device = device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = lm.evaluate(examples, batch_size=batch_size, device=device, precision=precision)
    metrics["examples"] = len(examples)
    return metrics
