"""LanguageModel: a GPT and its tokenizer, the object users load, generate with, train and save."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .config import GPTConfig, check_vocab_fits, preset
from .errors import CheckpointError, TokenizerError
from .generation.config import GenerationConfig
from .model import GPT
from .tokenizer import Tokenizer


class LanguageModel:
    def __init__(self, model: GPT, tokenizer: Tokenizer) -> None:
        check_vocab_fits(tokenizer, model.config)
        self.model = model
        self.tokenizer = tokenizer
        # Decoding defaults: a model directory's generation_config.json (HF's file), saved with the model.
        self.generation_config = GenerationConfig()

    @classmethod
    def from_preset(cls, name: str, tokenizer: Tokenizer, **overrides: Any) -> "LanguageModel":
        """A freshly initialised model of a named preset sized to the tokenizer's vocabulary."""
        overrides.setdefault("vocab_size", tokenizer.vocab_size)
        for role in ("pad", "bos", "eos"):
            overrides.setdefault(f"{role}_token_id", getattr(tokenizer, f"{role}_token_id"))
        config = preset(name, **overrides)
        from .options import check_model_memory

        check_model_memory(config)  # before the weights are allocated
        return cls(GPT(config), tokenizer)

    @property
    def config(self) -> GPTConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.embed.wte.weight.device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "LanguageModel":
        if device is not None:
            from .options import check_device

            check_device(str(device))  # one sentence for a device this machine lacks, not torch's assertion
        self.model.to(device=device, dtype=dtype)
        return self

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    def save(self, directory: str | os.PathLike, format: str = "gptgen", overwrite: bool = False) -> Path:
        """Write the model directory atomically; format "gptgen" (native), "hf" (transformers GPT-2) or
        "kerashub" (a preset keras_hub.models.GPT2CausalLM.from_preset loads).

        The directory must be new or empty; overwrite=True replaces a model directory gptgen wrote (files
        gptgen did not write are never deleted: such a directory is refused even then).
        """
        _check_path_argument(directory, "save()")
        checkpoint.check_write_target(directory, overwrite)  # refuse before any work
        if format == "kerashub":
            from . import kerashub

            kerashub.check_exportable(self.config, self.tokenizer)  # fail before writing anything
            return checkpoint.write_dir_atomically(
                directory, lambda tmp: kerashub.save_preset_files(tmp, _merged_copy(self.model), self.tokenizer),
                overwrite=overwrite)
        if format not in ("gptgen", "hf"):
            raise CheckpointError(f"Unknown checkpoint format {format!r}; choose 'gptgen', 'hf' or 'kerashub'.")
        writer = checkpoint.save_model_files if format == "gptgen" else checkpoint.save_hf_model_files
        if format == "hf":
            checkpoint.gptconfig_to_hf(self.config)  # fail before writing anything

        def fill(tmp: Path) -> None:
            writer(tmp, self.model)
            self.tokenizer.save(tmp)
            if self.generation_config.to_dict():
                self.generation_config.save(tmp)

        return checkpoint.write_dir_atomically(directory, fill, overwrite=overwrite)

    # Generation lives in gptgen.generation, training in gptgen.training; these are the entry points.
    def generate(self, prompts, config: GenerationConfig | None = None, **options):
        """Generate text with a GenerationConfig (default: self.generation_config) and keyword options over it
        (KerasHub and HF names); see gptgen.generation.generate."""
        from .generation import generate

        return generate(self, prompts, config, **options)

    def stream(self, prompt, config: GenerationConfig | None = None, **options):
        """Yield text pieces of one generation as tokens are produced."""
        from .generation import stream

        return stream(self, prompt, config, **options)

    def chat(self, messages, **options):
        """The assistant's answer to OpenAI-style messages through the chat template (template="auto": the
        model directory's chat_template); see gptgen.chat.chat for the options."""
        from .chat import chat

        return chat(self, messages, **options)

    # LoRA (gptgen.lora): adapters in peft's format ----------------------------------------------------
    def enable_lora(self, rank: int = 8, alpha: float = 16, dropout: float = 0.0, target=None,
                    use_rslora: bool = False) -> int:
        """Freeze the model and add trainable low-rank adapters (KerasHub's name; peft's LoRA) to its block
        Linears (target: default c_attn, c_proj, c_fc); returns the number of trainable parameters."""
        from .lora import enable_lora

        return enable_lora(self.model, rank, alpha, dropout, target, use_rslora)

    def load_lora(self, directory: str | os.PathLike, merge: bool = False) -> "LanguageModel":
        """Load a peft LoRA adapter directory (adapter_config.json + adapter_model.safetensors) onto the model."""
        from .lora import load_adapter

        load_adapter(self.model, directory, merge=merge)
        return self

    def save_lora(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the adapters alone as a peft adapter directory (peft.PeftModel.from_pretrained loads it)."""
        from .lora import save_adapter_files

        _check_path_argument(directory, "save_lora()")
        checkpoint.check_write_target(directory, overwrite)
        return checkpoint.write_dir_atomically(
            directory, lambda tmp: save_adapter_files(tmp, self.model, getattr(self.model, "name_or_path", None)),
            overwrite=overwrite)

    def merge_lora(self) -> "LanguageModel":
        """Fold the adapters into the weights (plain Linears again, every weight trainable)."""
        from .lora import merge_lora

        merge_lora(self.model)
        return self

    def fit(self, train_data, **options):
        """Train or fine-tune; see gptgen.training.fit."""
        from .training import fit

        self._check_batch(train_data, options, "batch_size", training=True)
        if options.get("eval_batch_size") and options.get("val_data") is not None:
            self._check_batch(options["val_data"], options, "eval_batch_size", training=False)
        return fit(self, train_data, **options)

    def evaluate(self, data, **options):
        """Loss, perplexity and token accuracy on data; see gptgen.training.evaluate."""
        from .training import evaluate

        self._check_batch(data, options, "batch_size", training=False)
        return evaluate(self, data, **options)

    def _check_batch(self, data, options: dict, name: str, training: bool) -> None:
        """Refuse a batch size whose batch would not fit in memory, before anything is tokenised or allocated
        (a batch never holds more rows than the data has examples)."""
        from .options import check_batch_memory

        size = options.get(name, 32)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            return  # the trainer's own check names it
        seq_len = options.get("seq_len") or getattr(data, "seq_len", None) or self.config.n_positions
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            return
        try:
            rows = len(data)
        except TypeError:
            rows = None
        accum = options.get("grad_accum", 1) if training else 1
        accum = accum if isinstance(accum, int) and not isinstance(accum, bool) and accum >= 1 else 1
        check_batch_memory(self.config, size, int(seq_len), examples=rows, grad_accum=accum, option=name,
                           training=training)

    def __repr__(self) -> str:
        return f"LanguageModel({self.num_parameters():,} parameters, {self.tokenizer!r})"


def _merged_copy(model: GPT) -> GPT:
    """The model itself, or for one with LoRA adapters a copy with them folded in (exports without adapters)."""
    from .lora import has_lora, merge_lora

    if not has_lora(model):
        return model
    import copy

    return merge_lora(copy.deepcopy(model))


def _check_path_argument(directory, what: str) -> None:
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        raise CheckpointError(f"{what} needs a model directory (a str or Path), got {directory!r}.")


def load(directory: str | os.PathLike, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, tokenizer: str | os.PathLike | Tokenizer | None = None,
         revision: str | None = None, quantize: str | None = None,
         lora: str | os.PathLike | None = None) -> LanguageModel:
    """Load a model directory (gptgen, Hugging Face GPT-2 or KerasHub preset) or a named pretrained model
    ("gpt2", "skt/kogpt2-base-v2", "user/repo@REV", "gpt2_base_en") as a LanguageModel; see docs/models.md.

    quantize="int8": int8 weight-only Linear layers for CPU decoding; "int8-dynamic": int8 weights and
    activations, the fastest CPU decoding where the CPU has AVX512-VNNI (gptgen.quantize).
    lora: a peft LoRA adapter directory to run with the model (merged into its weights)."""
    _check_path_argument(directory, "load()")
    from .options import check_device

    check_device(str(device))
    directory = checkpoint.resolve_dir(directory, revision)  # names go through the Hugging Face cache
    model = checkpoint.load_model(directory, device=device, dtype=dtype)
    if lora is not None:  # base + adapter, folded into the weights (the decode paths run plain Linears)
        from .lora import load_adapter

        load_adapter(model, lora, merge=True)
    if quantize:
        from .quantize import quantize_model

        quantize_model(model, quantize)
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        try:
            tok = Tokenizer.from_pretrained(tokenizer or directory)
        except TokenizerError as exc:
            raise CheckpointError(f"{directory} holds no usable tokenizer: {exc}") from None
        from .chat import read_chat_template

        tok.chat_template = read_chat_template(tokenizer or directory)
    lm = LanguageModel(model.eval(), tok)
    lm.generation_config = GenerationConfig.from_model_dir(directory) or lm.generation_config
    return lm
