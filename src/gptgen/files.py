"""Reading the files a model or adapter directory holds, with one sentence where one is missing or damaged: the
JSON objects (config.json, adapter_config.json) and safetensors weights. A leaf module (it imports only
errors), so checkpoint.py and lora.py share it without importing each other."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import CheckpointError


def read_json_object(path: Path) -> dict:
    """The JSON object in the file at path; CheckpointError where it is not valid JSON or not an object."""
    try:
        data = json.loads(Path(path).read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupt).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object.")
    return data


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; CheckpointError where it is missing, truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no weights file {path.name}.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({exc}).") from None
