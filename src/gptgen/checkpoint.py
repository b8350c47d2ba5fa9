"""Model directories: our native format and Hugging Face GPT-2 directories, in and out.

Native directory: config.json ({"format": "gptgen", ...GPTConfig}) + model.safetensors + tokenizer files.
HF GPT-2 directory: config.json (model_type "gpt2") + model.safetensors or pytorch_model.bin, as written
by GPT2LMHeadModel.save_pretrained. Every write goes to a temporary sibling directory that replaces the
target in one rename, so a crash never leaves a half-written model. A write never replaces what gptgen did
not write: the target must be new, empty, or (with overwrite) a model directory (see MODEL_DIR_FILES).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from .config import GPTConfig
from .errors import CheckpointError, ConfigError
from .files import load_safetensors, read_json_object
from .model import GPT

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HF_BIN_FILE = "pytorch_model.bin"


# Atomic writes ------------------------------------------------------------------------------------
# The files gptgen writes into a model directory (save, convert, the Trainer's last/ and best/). A directory
# counts as "a model directory gptgen wrote" when its config.json is a gptgen or Hugging Face GPT-2 config and
# every entry in it is a regular file named here; only such a directory may be replaced (overwrite=True).
MODEL_DIR_FILES = frozenset({
    "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "training_state.pt", "training_state.json", "metrics.json",
    "adapter_config.json", "adapter_model.safetensors",  # a LoRA run's adapter, in peft's format
})
# What lm.save(format="kerashub") writes: files at the top, the tokenizer's two files under assets/tokenizer/.
KERASHUB_DIR_FILES = frozenset({
    "config.json", "model.weights.h5", "tokenizer.json", "preprocessor.json", "task.json", "metadata.json",
    "assets/tokenizer/vocabulary.json", "assets/tokenizer/merges.txt",
})


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only swap it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(path: Path, directory: bool) -> None:
    """mkdtemp/mkstemp create 0700/0600 entries; give them the mode a plain mkdir/open would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def is_model_dir(directory: str | os.PathLike) -> bool:
    """True for a model directory gptgen could have written (see MODEL_DIR_FILES); False for anything else."""
    directory = Path(directory)
    if directory.is_symlink() or not directory.is_dir():
        return False
    try:
        entries = list(directory.iterdir())
        config = json.loads((directory / CONFIG_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    if isinstance(config, dict) and _is_kerashub(config):
        files = [p for p in directory.rglob("*") if not p.is_dir() or p.is_symlink()]
        return all(p.relative_to(directory).as_posix() in KERASHUB_DIR_FILES and p.is_file() and not p.is_symlink()
                   for p in files)
    if not isinstance(config, dict) or not (config.get("format") == "gptgen" or config.get("model_type") == "gpt2"):
        return False
    return all(e.name in MODEL_DIR_FILES and e.is_file() and not e.is_symlink() for e in entries)


def _foreign_entries(directory: Path) -> list[str]:
    return sorted(e.name for e in directory.iterdir()
                  if e.name not in MODEL_DIR_FILES or e.is_symlink() or not e.is_file())


def check_write_target(target: str | os.PathLike, overwrite: bool = False) -> Path:
    """The absolute target of a model-directory write, or CheckpointError when writing there could destroy
    something: a file, a non-empty directory gptgen did not write, a model directory without overwrite, or
    the current directory (or one holding it)."""
    target = Path(os.path.abspath(os.fspath(target)))
    if target.parent == target:
        raise CheckpointError(f"Cannot write a model directory to {target}; name a new directory, e.g. {target / 'model'}.")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise CheckpointError(f"{target} is a file (or a link), not a directory; gptgen writes a model only to a new "
                              "or empty directory, or replaces one it wrote with overwrite=True (--overwrite), so "
                              "choose another name.")
    if target.is_dir():
        try:
            entries = list(target.iterdir())
        except OSError as exc:
            raise CheckpointError(f"Cannot read the directory {target} ({exc.strerror or exc}).") from None
        if entries and not is_model_dir(target):
            foreign = _foreign_entries(target) or [CONFIG_FILE]
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise CheckpointError(
                f"{target} is not empty and is not a model directory gptgen wrote (it holds {foreign[0]}{more}); "
                "gptgen never deletes such files, not even with overwrite=True (--overwrite), so choose a new "
                "directory.")
        cwd = Path(os.path.abspath(os.getcwd()))
        if cwd == target or target in cwd.parents:
            raise CheckpointError(f"{target} is the current directory (or holds it), which gptgen does not replace "
                                  f"even with overwrite=True (--overwrite); write to a new directory such as "
                                  f"{target / 'model'}.")
        if entries and not overwrite:
            raise CheckpointError(f"{target} already holds a model; pass overwrite=True (--overwrite on the "
                                  "command line) to replace it, or choose another directory.")
    return target


def recover_dir(target: str | os.PathLike) -> Path:
    """Undo what a crash between write_dir_atomically's two renames leaves: the old directory moved aside
    and the new one not yet in place. Puts the old one back and removes stale temporaries."""
    target = Path(os.path.abspath(os.fspath(target)))
    if target.parent == target or not target.parent.is_dir():
        return target
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not target.exists():
        for old in reversed(olds):
            if (old / "x").is_dir():
                os.replace(old / "x", target)
                break
    for stale in olds + list(target.parent.glob(f".{target.name}.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)
    return target


def _os_error(exc: OSError, target: Path) -> CheckpointError:
    parent = target.parent
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        return CheckpointError(f"Cannot write {target}: {parent} is a file, not a directory.")
    return CheckpointError(f"Cannot write {target} ({exc.strerror or exc}); check that {target.parent} is a "
                           "writable directory.")


def write_dir_atomically(target: str | os.PathLike, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call fill(tmp_dir) and move tmp_dir to target in one rename.

    The target must be new, an empty directory, or (with overwrite=True) a model directory gptgen wrote
    (see check_write_target); anything else is refused before anything is written. Replacing takes two
    renames (old aside, new in); recover_dir() repairs a crash between them.
    """
    target = check_write_target(recover_dir(target), overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise _os_error(exc, target) from None
    try:
        fill(tmp)
        # mkdtemp makes 0700 and some writers (safetensors) 0600 files: give what we wrote plain modes.
        for path in [tmp, *tmp.rglob("*")]:
            if not path.is_symlink():
                _honour_umask(path, directory=path.is_dir())
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file through a temporary sibling and one rename (mode as a plain open() would give it)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as exc:
        raise _os_error(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Native format -----------------------------------------------------------------------------------
def model_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict with a tied LM head stored once (safetensors refuses shared storage)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_model_files(directory: Path, model: GPT) -> None:
    (directory / CONFIG_FILE).write_text(model.config.to_json(), "utf-8")
    save_file(model_state_dict(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    from . import lora

    if lora.has_lora(model):  # the adapter also in peft's format (model.safetensors keeps base + lora_ keys)
        lora.save_adapter_files(directory, model, getattr(model, "name_or_path", None))


def is_hf_gpt2_dir(directory: Path) -> bool:
    config = _read_config(directory)
    return config.get("format") != "gptgen" and config.get("model_type") == "gpt2"


def _is_kerashub(config: dict) -> bool:
    return str(config.get("registered_name", "")).startswith("keras_hub>")


def _read_config(directory: Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise CheckpointError(f"Model directory {directory} does not exist.")
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}; it is not a model directory.")
    return read_json_object(path)


def resolve_dir(name_or_dir: str | os.PathLike, revision: str | None = None, *, config_only: bool = False) -> Path:
    """A local model directory for a directory, a Hub repo id ("user/repo@rev") or a KerasHub preset name."""
    from . import hub

    return hub.resolve(name_or_dir, revision, config_only=config_only)


def read_config(directory: str | os.PathLike, revision: str | None = None) -> GPTConfig:
    """The GPTConfig of a native, HF GPT-2 or KerasHub directory (or of a named Hub model)."""
    directory = resolve_dir(directory, revision, config_only=True)
    data = _read_config(directory)
    if _is_kerashub(data):
        from . import kerashub

        return kerashub.read_config(directory)
    if data.get("format") == "gptgen":
        try:
            return GPTConfig.from_dict(data)
        except (TypeError, ConfigError) as exc:
            raise CheckpointError(f"{directory / CONFIG_FILE} is not a valid gptgen config: {exc}") from None
    if data.get("model_type") == "gpt2":
        return hf_config_to_gptconfig(data)
    raise CheckpointError(
        f"{directory / CONFIG_FILE} is neither a gptgen config nor a Hugging Face GPT-2 config "
        f"(model_type={data.get('model_type')!r})."
    )


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, revision: str | None = None) -> GPT:
    """Load a GPT from a native, HF GPT-2 or KerasHub directory, or a named Hub model."""
    directory = resolve_dir(directory, revision)
    config = read_config(directory)
    if _is_kerashub(_read_config(directory)):
        from . import kerashub

        state = kerashub.read_state(directory, config)
    elif is_hf_gpt2_dir(directory):
        state = hf_state_to_native(_load_hf_weights(directory), config)
    else:
        state = load_safetensors(directory / WEIGHTS_FILE)
    from . import lora

    state, adapter = lora.split_lora_state(state)  # a LoRA run's checkpoint: base + adapter
    model = _build_with_state(config, state, directory)
    if adapter:  # loaded for use: the adapter folded into the weights (settings from adapter_config.json)
        settings = read_json_object(directory / lora.ADAPTER_CONFIG) if lora.is_adapter_dir(directory) else {}
        lora.apply_adapter(model, settings, adapter, where=str(directory))
        lora.merge_lora(model)
    model.name_or_path = str(directory)
    return model.to(device=device, dtype=dtype) if dtype else model.to(device)


def _build_with_state(config: GPTConfig, state: dict[str, torch.Tensor], where: Path) -> GPT:
    with torch.device("meta"):
        model = GPT(config)
    expected = model_state_dict(model)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"The weights in {where} lack {len(missing)} tensor(s) the config needs, e.g. {missing[0]}.")
    unexpected = sorted(set(state) - set(expected) - {"lm_head.weight"})
    if unexpected:
        raise CheckpointError(f"The weights in {where} hold tensor(s) the config does not describe, e.g. {unexpected[0]}.")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"Weight {name} in {where} has shape {tuple(state[name].shape)} but config.json implies "
                f"{tuple(tensor.shape)}."
            )
    model = model.to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.wte.weight
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=False, assign=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.wte.weight
    return model


# Hugging Face GPT-2 --------------------------------------------------------------------------------
_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                   "gelu": "gelu", "gelu_python": "gelu", "relu": "relu"}


def hf_config_to_gptconfig(data: dict) -> GPTConfig:
    # What transformers' GPT2 reads from config.json: n_ctx is only a legacy alias of n_positions,
    # reorder_and_upcast_attn only changes fp16 numerics (same maths in fp32); the fields below that change
    # the maths are refused.
    act = data.get("activation_function", "gelu_new")
    if act not in _HF_ACTIVATIONS:
        raise CheckpointError(f"GPT-2 activation_function {act!r} is not supported; gptgen supports "
                              f"{', '.join(_HF_ACTIVATIONS)}.")
    if data.get("scale_attn_by_inverse_layer_idx"):
        raise CheckpointError("GPT-2 checkpoints with scale_attn_by_inverse_layer_idx=true are not supported.")
    if data.get("scale_attn_weights", True) is False:
        raise CheckpointError("GPT-2 checkpoints with scale_attn_weights=false are not supported.")
    if data.get("add_cross_attention"):
        raise CheckpointError("GPT-2 checkpoints with add_cross_attention=true (encoder-decoder) are not supported.")
    try:
        return GPTConfig(
            vocab_size=data["vocab_size"], n_positions=data.get("n_positions", data.get("n_ctx", 1024)),
            n_embd=data["n_embd"], n_layer=data["n_layer"], n_head=data["n_head"],
            n_inner=data.get("n_inner"), activation=_HF_ACTIVATIONS[act],
            layer_norm_epsilon=data.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=data.get("tie_word_embeddings", True),
            bos_token_id=data.get("bos_token_id"), eos_token_id=_first(data.get("eos_token_id")),
            pad_token_id=data.get("pad_token_id"),
        )
    except KeyError as exc:
        raise CheckpointError(f"The GPT-2 config.json lacks the field {exc.args[0]!r}.") from None
    except ConfigError as exc:
        raise CheckpointError(f"The GPT-2 config.json is invalid: {exc}") from None


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def gptconfig_to_hf(config: GPTConfig) -> dict:
    if (config.norm_position != "pre" or not config.final_norm or config.lm_head_bias
            or config.attn_inner_dim != config.n_embd or config.activation == "relu"):
        raise CheckpointError(
            "Only GPT-2-shaped models (pre-norm, GELU, final LayerNorm, head without bias, "
            "n_embd divisible by n_head) can be exported to the Hugging Face GPT-2 format."
        )
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.n_positions, "n_ctx": config.n_positions,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.n_inner,
        "activation_function": {"gelu_tanh": "gelu_new", "gelu": "gelu"}[config.activation],
        "layer_norm_epsilon": config.layer_norm_epsilon, "initializer_range": config.init_std,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, "use_cache": True,
    }


_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # HF Conv1D stores (in, out)


def _load_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    st = directory / WEIGHTS_FILE
    if st.is_file():
        return load_safetensors(st)
    binary = directory / HF_BIN_FILE
    if binary.is_file():
        try:
            return torch.load(str(binary), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds on truncated zip/pickle data
            raise CheckpointError(f"{binary} is truncated, corrupt, or not a plain weights file ({type(exc).__name__}).") from None
    raise CheckpointError(f"{directory} has neither {WEIGHTS_FILE} nor {HF_BIN_FILE}.")


def hf_state_to_native(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
            continue  # causal-mask buffers of old checkpoints
        if name.startswith("wte.") or name.startswith("wpe."):
            name = "embed." + name
        elif name.startswith("h."):
            name = "blocks." + name[2:]
            if any(part in name for part in _CONV1D) and name.endswith(".weight"):
                tensor = tensor.t()
        elif name.startswith("ln_f.") or name.startswith("lm_head."):
            pass
        else:
            raise CheckpointError(f"Unexpected tensor {key!r} in the GPT-2 checkpoint.")
        out[name] = tensor.contiguous()
    return out


def native_state_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    out = {}
    from . import lora

    state = model_state_dict(model)
    if lora.has_lora(model):  # transformers' GPT-2 has no adapters: export the merged weights
        state = {k: v for k, v in lora.merged_state_dict(model).items() if k in state}
    for name, tensor in state.items():
        if name.startswith("embed."):
            key = "transformer." + name[len("embed."):]
        elif name.startswith("blocks."):
            key = "transformer.h." + name[len("blocks."):]
            if any(part in name for part in _CONV1D) and name.endswith(".weight"):
                tensor = tensor.t()
        elif name.startswith("ln_f."):
            key = "transformer." + name
        else:
            key = name
        out[key] = tensor.contiguous()
    return out


def save_hf_model_files(directory: Path, model: GPT) -> None:
    config = gptconfig_to_hf(model.config)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2), "utf-8")
    save_file(native_state_to_hf(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2), "utf-8")
