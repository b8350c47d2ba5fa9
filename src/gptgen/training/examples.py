"""Training data as the Trainer reads it: packed tensors or a map-style dataset, checked against the model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import DataError, TrainingError

if TYPE_CHECKING:  # the training package does not import lm.py (lm.py imports it)
    from ..lm import LanguageModel


class Examples:
    """Packed examples as three tensors (input_ids, labels, loss_mask), or any map-style dataset of dicts."""

    def __init__(self, data) -> None:
        self.tensors = None
        self.dataset = None
        if all(hasattr(data, k) for k in ("input_ids", "labels")) and isinstance(getattr(data, "input_ids"), torch.Tensor):
            self.tensors = self._check(data.input_ids, data.labels, getattr(data, "loss_mask", None))
        elif isinstance(data, dict):
            if "input_ids" not in data or "labels" not in data:
                raise TrainingError("A dict of training data needs 'input_ids' and 'labels' tensors.")
            self.tensors = self._check(data["input_ids"], data["labels"], data.get("loss_mask"))
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self.dataset = data
        else:
            raise TrainingError(
                f"Cannot train on a {type(data).__name__}; pass texts, gptgen.data PackedExamples, "
                "a dict of tensors or a map-style dataset of dicts."
            )

    @staticmethod
    def _check(input_ids, labels, loss_mask):
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if input_ids.dim() != 2 or input_ids.shape != labels.shape:
            raise TrainingError(
                f"input_ids and labels must be (examples, seq_len) tensors of one shape, got "
                f"{tuple(input_ids.shape)} and {tuple(labels.shape)}."
            )
        if loss_mask is None:
            loss_mask = labels >= 0
        loss_mask = torch.as_tensor(loss_mask, dtype=torch.bool)
        labels = labels.clamp_min(0)  # ignore_index-style labels (-100) are masked out
        return input_ids.contiguous(), labels.contiguous(), loss_mask.contiguous()

    def __len__(self) -> int:
        return self.tensors[0].shape[0] if self.tensors is not None else len(self.dataset)

    @property
    def seq_len(self) -> int:
        return self.get(torch.tensor([0]))["input_ids"].shape[1]

    def get(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.tensors is not None:
            x, y, m = self.tensors
            return {"input_ids": x[idx], "labels": y[idx], "loss_mask": m[idx]}
        items = [self.dataset[int(i)] for i in idx]
        out = {}
        for key in ("input_ids", "labels", "loss_mask"):
            if key in items[0]:
                out[key] = torch.stack([torch.as_tensor(it[key]) for it in items])
        if "loss_mask" not in out:
            out["loss_mask"] = out["labels"] >= 0
        out["labels"] = out["labels"].clamp_min(0)
        out["loss_mask"] = out["loss_mask"].bool()
        return out

    def max_token_id(self) -> int:
        if self.tensors is None:
            return -1
        return int(max(self.tensors[0].max(), self.tensors[1].max())) if self.tensors[0].numel() else -1


def as_examples(lm: LanguageModel, data, seq_len: int | None = None, add_bos: bool | None = None,
                add_eos: bool = False, what: str = "training") -> Examples:
    """Texts (a list of str) are tokenised and packed; other forms are used as they are."""
    if isinstance(data, Examples):
        return data
    if isinstance(data, str):
        raise TrainingError("Pass a list of texts (or packed examples), not a single string.")
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, str) for t in data):
        from ..data.packing import pack_texts

        if add_bos is None:
            add_bos = bool(lm.config.extra.get("add_bos", False))
        return Examples(pack_texts(list(data), lm.tokenizer, seq_len or lm.config.n_positions, "pad",
                                    add_bos, add_eos))
    if isinstance(data, (list, tuple)) and not data:
        if what == "validation":
            raise DataError("The validation data is empty (an empty list); pass val_data=None to train without "
                            "validation.")
        raise DataError(f"There are no {what} examples (the list of texts is empty).")
    return Examples(data)


def check_examples(lm: LanguageModel, data: Examples, what: str) -> None:
    """DataError for no examples, TrainingError for examples longer than the context or ids past the vocabulary."""
    if len(data) == 0:
        raise DataError(f"There are no {what} examples.")
    seq_len = data.seq_len
    ctx = lm.config.n_positions
    if seq_len > ctx:
        raise TrainingError(
            f"The {what} examples are {seq_len} tokens long but the model's context holds only {ctx} "
            f"positions; use seq_len <= {ctx} or a model with n_positions >= {seq_len}."
        )
    top = data.max_token_id()
    if top >= lm.config.vocab_size:
        raise TrainingError(
            f"The {what} data holds token id {top} but the model's vocabulary has only "
            f"{lm.config.vocab_size:,} entries; the tokenizer and the model do not match."
        )
