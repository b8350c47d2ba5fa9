"""FSDP2 (torch.distributed.fsdp.fully_shard) for the Trainer: shard, gather for checkpoints, load for resume.

Each decoder block is one FSDP group and the loss module is the root group: the root holds the embeddings,
the final norm and the LM head, so the tied embedding/head tensor lives in one group (it is one Parameter).
The loss module is the root rather than the GPT because the loss calls model.hidden_states and the head's
weight directly, not GPT.forward: FSDP unshards a group around its module's __call__.

Checkpoints stay in the single-process format: the full weights are gathered to rank 0 and written as a
normal model directory, and the optimizer state is gathered and stored as torch's index-keyed
optimizer.state_dict() of an unsharded model, so a run resumes with or without FSDP, on any number of
processes. On resume every rank reads the full state and keeps its own shard.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import TrainingError


def shard(loss_module: nn.Module, model: nn.Module, precision: str) -> None:
    """fully_shard each block, then the loss module as the root; bf16: bf16 compute, fp32 gradient reduce."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision == "fp16":
        raise TrainingError("fsdp (--fsdp) trains in fp32 or bf16 (its mixed-precision policy); fp16 needs a "
                            "gradient scaler it does not use here, so choose --precision bf16 or fp32.")
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16" else MixedPrecisionPolicy())
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(loss_module, mp_policy=policy)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _names(loss_module: nn.Module) -> dict[int, str]:
    """Parameter id -> name under the loss module (model.blocks.0...), tied tensors once."""
    return {id(p): name for name, p in loss_module.named_parameters()}


def gather_model_state(loss_module: nn.Module) -> dict[str, torch.Tensor]:
    """The full weights (gptgen names, on CPU) on rank 0; {} elsewhere. Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(loss_module, options=_options(cpu_offload=True))
    return {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}


def gather_optimizer_state(loss_module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() as an unsharded model's optimizer would give it (index keys), on rank 0."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(loss_module, optimizer, options=_options(cpu_offload=True))
    if not full:
        return {}
    names = _names(loss_module)
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups, start = [], 0
    for saved, live in zip(full["param_groups"], optimizer.param_groups):
        n = len(live["params"])
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": list(range(start, start + n))})
        start += n
    return {"state": {index[name]: state for name, state in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(loss_module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an index-keyed optimizer.state_dict() (every rank holds all of it) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _names(loss_module)
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if len(order) != sum(len(g["params"]) for g in state["param_groups"]):
        raise TrainingError("The checkpoint's optimizer state does not fit this run's trainable parameters; resume "
                            "with the command that started the run.")
    full = {"state": {order[int(i)]: s for i, s in state["state"].items()},
            "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [order[i] for i in g["params"]]}
                             for g in state["param_groups"]]}
    set_optimizer_state_dict(loss_module, optimizer, full, options=_options())


def load_model_state(loss_module: nn.Module, weights: dict[str, torch.Tensor]):
    """Load full weights (gptgen names; every rank holds all of them) into the sharded model; returns
    (missing, unexpected) names as nn.Module.load_state_dict does."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    expected = {k[len("model."):] for k in loss_module.state_dict()}
    missing = sorted(expected - set(weights))
    unexpected = sorted(set(weights) - expected)
    known = {"model." + k: v for k, v in weights.items() if k in expected}
    set_model_state_dict(loss_module, known, options=_options(strict=False))
    return missing, unexpected


def plain_model(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """An unsharded copy of the model's architecture (LoRA layers too) holding the given full weights."""
    from ..lora import enable_lora
    from ..model import GPT

    with torch.device("meta"):
        plain = GPT(model.config)
    settings = getattr(model, "lora_settings", None)
    if settings is not None:
        enable_lora(plain, settings["r"], settings["lora_alpha"], settings["lora_dropout"],
                    settings["target_modules"], settings["use_rslora"])
    plain = plain.to_empty(device="cpu")
    if model.config.tie_word_embeddings:
        plain.lm_head.weight = plain.embed.wte.weight
    dtype = next(iter(state.values())).dtype if state else torch.float32
    plain.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    for name, p in plain.named_parameters():
        p.requires_grad_(settings is None or ".lora_" in name)
    plain.gradient_checkpointing = getattr(model, "gradient_checkpointing", False)
    return plain


class _Holder:
    """Stands in for an object in checkpointing's view: fixed attributes first, then the real object's."""

    def __init__(self, real, **fixed) -> None:
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_fixed", fixed)

    def __getattr__(self, name):
        fixed = object.__getattribute__(self, "_fixed")
        return fixed[name] if name in fixed else getattr(object.__getattribute__(self, "_real"), name)

    def __setattr__(self, name, value) -> None:
        setattr(object.__getattribute__(self, "_real"), name, value)


def save_view(trainer, with_optimizer: bool = True):
    """On rank 0: a view of the trainer whose model is a full unsharded copy and whose optimizer gives the
    gathered index-keyed state (what checkpointing writes); None on other ranks. Collective."""
    state = gather_model_state(trainer.loss_module)
    optim = gather_optimizer_state(trainer.loss_module, trainer.optimizer) if with_optimizer else None
    if not trainer.is_main:
        return None
    lm = _Holder(trainer.lm, model=plain_model(trainer.lm.model, state))
    optimizer = _Holder(trainer.optimizer, state_dict=lambda: optim)
    return _Holder(trainer, lm=lm, optimizer=optimizer)


def resume_view(trainer):
    """A view of the trainer for checkpointing.resume: loading the model's weights and the optimizer's state
    goes into the shards (every rank reads the whole checkpoint)."""
    loss_module = trainer.loss_module

    class _Model:
        config = trainer.lm.model.config

        @staticmethod
        def load_state_dict(weights, strict=False):
            return load_model_state(loss_module, weights)

        def __getattr__(self, name):
            return getattr(trainer.lm.model, name)

    optimizer = _Holder(trainer.optimizer, load_state_dict=lambda s: load_optimizer_state(loss_module, trainer.optimizer, s))
    return _Holder(trainer, lm=_Holder(trainer.lm, model=_Model()), optimizer=optimizer)


def unshard_into(trainer) -> None:
    """After training: every rank's lm.model becomes a plain model with the full trained weights (so the
    LanguageModel generates and saves as usual). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(trainer.loss_module, options=_options())
    state = {k[len("model."):]: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
             for k, v in full.items() if k.startswith("model.")}
    trainer.lm.model = plain_model(trainer.lm.model, state).to(trainer.device)
