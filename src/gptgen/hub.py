"""Model names → local directories, through the Hugging Face Hub cache.

Every place that takes a model (gptgen.load, the checkpoint reader, each CLI --model/--base) passes what
the user typed through resolve(). A local directory wins; otherwise the text is a Hub repo id with an
optional "@revision" (or one of KerasHub's GPT-2 preset names, mapped to the Hub repos with the same
OpenAI weights), and resolve() returns the cached snapshot directory holding only the files gptgen needs:
config.json, one weights file (model.safetensors preferred, else pytorch_model.bin) and the tokenizer files.

Downloads go through huggingface_hub.hf_hub_download, so its cache layout, progress bars and environment
(HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN, HF_ENDPOINT) apply unchanged; a cached model loads
with no network at all.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import CheckpointError

# KerasHub's GPT-2 presets hold OpenAI's released weights, the same ones as these Hub repos.
KERAS_HUB_PRESETS = {
    "gpt2_base_en": "openai-community/gpt2",
    "gpt2_medium_en": "openai-community/gpt2-medium",
    "gpt2_large_en": "openai-community/gpt2-large",
    "gpt2_extra_large_en": "openai-community/gpt2-xl",
}

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# Alternatives, first found wins: a tokenizer.json, a vocab.json + merges.txt pair, a SentencePiece model.
TOKENIZER_ALTERNATIVES = (("tokenizer.json",), ("vocab.json", "merges.txt"),
                          ("tokenizer.model",), ("spiece.model",), ("sentencepiece.bpe.model",))
KERAS_HUB_FILES = ("model.weights.h5", "tokenizer.json", "preprocessor.json", "task.json",
                   "assets/tokenizer/vocabulary.json", "assets/tokenizer/merges.txt")

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?$")


def split_name(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """("user/repo", "rev") from "user/repo@rev"; a KerasHub preset name becomes its Hub repo."""
    repo, _, rev = name.partition("@")
    if rev and revision and rev != revision:
        raise CheckpointError(f"{name} names revision {rev!r} but revision={revision!r} was also given.")
    return KERAS_HUB_PRESETS.get(repo, repo), (rev or revision or None)


def looks_like_repo_id(name: str) -> bool:
    repo, _, rev = name.partition("@")
    return bool(_REPO_ID.match(repo)) and ".." not in repo and not repo.endswith((".json", ".safetensors", ".bin"))


def resolve(name_or_dir: str | os.PathLike, revision: str | None = None, *, config_only: bool = False) -> Path:
    """The local directory for a model directory, a Hub repo id ("user/repo@rev") or a KerasHub preset name.

    A local directory of that name wins over a repo id. config_only fetches just config.json (for summaries).
    """
    path = Path(name_or_dir)
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(f"{path} is a local directory; revision={revision!r} applies only to Hub names.")
        return path
    name = str(name_or_dir)
    # "runs/mini" with a local runs/ directory is a mistyped path, not a Hub user's repo.
    if isinstance(name_or_dir, Path) or not looks_like_repo_id(name) or ("/" in name and path.parent.is_dir()):
        raise CheckpointError(f"Model directory {name} does not exist.")
    repo, rev = split_name(name, revision)
    return _download(name, repo, rev, config_only=config_only)


def download(name: str, revision: str | None = None) -> Path:
    """Fetch a named model into the Hugging Face cache (for later offline use); returns its directory."""
    if not looks_like_repo_id(name):
        raise CheckpointError(f"{name} is not a Hugging Face Hub repo id (user/repo[@revision]) or a KerasHub preset name.")
    repo, rev = split_name(name, revision)
    return _download(name, repo, rev)


def _download(name: str, repo: str, revision: str | None, config_only: bool = False) -> Path:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise CheckpointError(
            f"Loading {name} from the Hugging Face Hub needs huggingface_hub: pip install 'gptgen[hub]' "
            f"(or pass a local model directory)."
        ) from None
    config_path = _fetch(name, repo, "config.json", revision, required=True)
    directory = Path(config_path).parent
    # The snapshot directory is named by the commit config.json came from. Asking for the other files at
    # that commit keeps them consistent and lets the hub library answer from the cache without a request.
    revision = directory.name
    config = _read_json(config_path, name)
    keras = str(config.get("registered_name", "")).startswith("keras_hub>")
    if not keras:
        check_gpt2_config(config, name)
    if config_only:
        return directory
    if keras:
        if _fetch(name, repo, "model.weights.h5", revision) is None:
            raise CheckpointError(f"{_where(repo, revision)} is a KerasHub preset without model.weights.h5.")
        for filename in KERAS_HUB_FILES[1:]:
            _fetch(name, repo, filename, revision)
        return directory
    if not any(_fetch(name, repo, filename, revision) for filename in WEIGHT_FILES):
        raise CheckpointError(
            f"{_where(repo, revision)} has neither model.safetensors nor pytorch_model.bin "
            f"(sharded, TensorFlow-only and Flax-only checkpoints are not supported)."
        )
    for filename in TOKENIZER_FILES:
        _fetch(name, repo, filename, revision)
    for group in TOKENIZER_ALTERNATIVES:
        found = [_fetch(name, repo, filename, revision) for filename in group[:1]]
        if found[0] is not None:
            for filename in group[1:]:
                _fetch(name, repo, filename, revision)
            break
    return directory


def check_gpt2_config(config: dict, name: str) -> None:
    """Refuse, in one sentence, a config.json that is not the GPT-2 architecture."""
    model_type = config.get("model_type")
    if model_type == "gpt2":
        return
    arch = (config.get("architectures") or [None])[0] or f"model_type {model_type!r}"
    raise CheckpointError(
        f"{name} is {arch}, which gptgen does not support; gptgen loads GPT-2 models "
        f"(model_type \"gpt2\", e.g. openai-community/gpt2 or skt/kogpt2-base-v2)."
    )


def _where(repo: str, revision: str | None) -> str:
    return f"{repo}@{revision}" if revision else repo


def _read_json(path: str, name: str) -> dict:
    try:
        data = json.loads(Path(path).read_text("utf-8"))
    except (OSError, ValueError):
        raise CheckpointError(f"The config.json of {name} is not valid JSON.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"The config.json of {name} does not hold a JSON object.")
    return data


def _fetch(name: str, repo: str, filename: str, revision: str | None, required: bool = False) -> str | None:
    """The cached path of one file of the repo, downloading it if needed; None if the repo lacks it."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, HFValidationError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    from huggingface_hub.file_download import _CACHED_NO_EXIST

    if not required and re.fullmatch(r"[0-9a-f]{40}", revision or ""):
        if try_to_load_from_cache(repo, filename, revision=revision) is _CACHED_NO_EXIST:
            return None  # known to be absent at this commit: no request
    try:
        return hf_hub_download(repo, filename, revision=revision)
    except HFValidationError:
        raise CheckpointError(f"Model directory {name} does not exist (and it is not a valid Hub repo id).") from None
    except GatedRepoError:
        raise CheckpointError(
            f"{_where(repo, revision)} is a gated repo: accept its terms on the Hub, then log in with "
            f"`hf auth login` or set HF_TOKEN."
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{name} is neither a local model directory nor a Hugging Face Hub repo you can access "
            f"(for a private repo, log in with `hf auth login` or set HF_TOKEN)."
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo} has no revision {revision!r} (a branch, tag or commit hash).") from None
    except LocalEntryNotFoundError:
        # Not downloadable now (offline or unreachable); the cache may still know the file is absent.
        cached = try_to_load_from_cache(repo, filename, revision=revision)
        if cached is _CACHED_NO_EXIST and not required:
            return None
        if isinstance(cached, str):
            return cached
        if filename != "config.json" and not required:
            if _cached_commit(repo, revision) is not None:
                return None  # the snapshot was fetched without this optional file
        cache = constants.HF_HUB_CACHE
        offline = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE
        if offline:
            raise CheckpointError(
                f"{name} is neither a local directory nor in the Hugging Face cache ({cache}), and HF_HUB_OFFLINE=1 "
                f"forbids downloading it; run `gptgen download {name}` with network access first, or unset HF_HUB_OFFLINE."
            ) from None
        raise CheckpointError(
            f"{name} is neither a local directory nor in the Hugging Face cache ({cache}), and the Hub at "
            f"{constants.ENDPOINT} cannot be reached; run `gptgen download {name}` where there is network, with "
            f"HF_HOME pointing at this cache."
        ) from None
    except EntryNotFoundError:
        if required:
            raise CheckpointError(
                f"{_where(repo, revision)} has no {filename}, so it is not a transformers model repo gptgen can load."
            ) from None
        return None
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", "?")
        raise CheckpointError(f"The Hugging Face Hub answered HTTP {status} for {filename} of {_where(repo, revision)}.") from None


def _cached_commit(repo: str, revision: str | None) -> str | None:
    """The commit a cached branch/tag points to, or the revision itself when it is a commit hash."""
    from huggingface_hub import constants

    revision = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None
