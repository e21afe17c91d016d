"""Model folders checked before anything is loaded: model paths (a local folder or a hub id), the weights a
checkpoint holds (read from safetensors headers, no tensor loaded), reward-model folders, and the identity of a
model's weight files (RAFT's resume fingerprint, the server's /info)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# A hub id: ``owner/name`` (letters, digits, ``-``, ``_``, ``.``), never a path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# This project's output root (every recipe's output_dir): a path under it is a missing stage, never a hub id.
OUTPUT_ROOT = "outputs"
TRUTHY = {"1", "on", "yes", "true"}


class ModelPathError(FileNotFoundError, ValueError):
    """A model path that is neither a local folder nor a reachable hub id (a ``FileNotFoundError`` and a
    ``ValueError``, so callers catching either see it)."""


def hub_offline() -> bool:
    """Whether the hub must not be contacted (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants

    env = (os.environ.get(name, "").strip().lower() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(value in TRUTHY for value in env)


def check_model_path(
    path: str | Path | None,
    setting: str = "model_name_or_path",
    hint: str = "point it at a local model folder or a hub id (owner/name)",
    revision: str | None = None,
) -> str:
    """``"local"`` or ``"hub"``; raises :class:`ModelPathError` (naming ``setting``) for anything else.

    Local when the path exists (it must be a folder). A hub id only when it has the ``owner/name`` shape, does
    not start with ``.``, ``/`` or ``~``, and its first component is neither an existing local folder nor
    ``outputs`` (then it is a missing folder, not a hub id, and ``from_pretrained`` would spend a minute in
    hub retries). With ``HF_HUB_OFFLINE=1`` a hub id must already be in the local hub cache.
    """
    if not path:
        raise ModelPathError(f"{setting} is not set: {hint}")
    text = str(path)
    local = Path(text).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelPathError(f"{setting}={text!r} is a file, not a model folder: {hint}")
        return "local"
    first = text.split("/")[0]
    if (
        text.startswith((".", "/", "~"))
        or not HUB_ID.fullmatch(text)
        or first == OUTPUT_ROOT
        or Path(first).expanduser().is_dir()
    ):
        raise ModelPathError(f"{setting}={text!r}: no such folder (and not a hub id of the form owner/name); {hint}")
    if hub_offline() and not _in_hub_cache(text, revision):
        raise ModelPathError(
            f"{setting}={text!r}: no such local folder, and HF_HUB_OFFLINE=1 forbids downloading it from the hub "
            f"(it is not in the local hub cache); {hint}, or unset HF_HUB_OFFLINE"
        )
    return "hub"


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(
        isinstance(try_to_load_from_cache(repo_id, name, revision=revision), str)
        for name in ("config.json", "tokenizer_config.json")
    )


# --------------------------------------------------------------------------------------------
# Reward-model folders, checked before anything is loaded or generated


def checkpoint_keys(path: str | Path, revision: str | None = None) -> set[str] | None:
    """Parameter names a checkpoint stores, from safetensors headers or the shard index (no tensor is read).

    ``None`` when they cannot be known without loading the weights (only ``pytorch_model.bin``, or a hub id
    whose metadata cannot be fetched); an empty set when a local folder holds no weights at all.
    """
    folder = Path(path).expanduser()
    if folder.is_dir():
        return _folder_keys(folder)
    from huggingface_hub import get_safetensors_metadata, try_to_load_from_cache

    for name in ("model.safetensors.index.json", "model.safetensors"):
        cached = try_to_load_from_cache(str(path), name, revision=revision)
        if isinstance(cached, str):
            return _folder_keys(Path(cached).parent)
    if hub_offline():
        return None
    try:
        return set(get_safetensors_metadata(str(path), revision=revision).weight_map)
    except Exception as err:  # no safetensors on the hub, no network: the head is not checked
        logger.warning("%s: cannot read the checkpoint's parameter names (%s)", path, err)
        return None


def _folder_keys(folder: Path) -> set[str] | None:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    if (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", framework="pt") as f:
            return set(f.keys())
    if any(folder.glob("pytorch_model*.bin")):
        return None
    return set()


def head_parameter_names(config) -> list[str] | None:
    """The sequence-classification head's parameter names for ``config`` (``score.weight`` for Llama/GPT-Neo,
    ``classifier.*`` for BERT): built on the meta device, so nothing is allocated. ``None`` if it cannot be built."""
    import torch
    from transformers import AutoModelForSequenceClassification

    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
    except Exception as err:  # custom code, an unknown architecture: the head is not checked
        logger.warning("cannot build %s on the meta device (%s): reward head not checked", type(config).__name__, err)
        return None
    prefix = f"{model.base_model_prefix}."
    return [name for name, _ in model.named_parameters() if not name.startswith(prefix)]


def check_reward_model(
    path: str | Path | None, setting: str = "reward_model_name_or_path", revision: str | None = None
) -> PreTrainedTokenizerBase:
    """Refuse, with a ``ValueError`` naming ``setting``, a folder that is not a reward model; returns its tokenizer.

    A reward model folder (the RM recipe's output) has a config.json whose ``architectures`` is a
    ``*ForSequenceClassification`` with ``num_labels == 1``, weights that hold that head (read from the
    safetensors headers, nothing is loaded), and a tokenizer whose pad token is distinct from EOS. A causal LM
    would otherwise be scored by a randomly initialised head, and RAFT would fine-tune against noise.
    """
    from transformers import AutoConfig

    fix = "point it at a reward model folder (the output of recipes/rm.py, `make rm`)"
    where = f"{setting}={str(path)!r}"
    if check_model_path(path, setting, fix, revision) == "local":
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelPathError(f"{where}: no config.json there, so not a model folder; {fix}")
    try:
        config = AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as err:
        raise ValueError(f"{where}: cannot read its config ({err}); {fix}") from err
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(
            f"{where} is a {'/'.join(architectures) or 'model without architectures in its config'}, not a reward "
            f"model: a *ForSequenceClassification with num_labels=1 is needed (a causal LM would be scored by a "
            f"randomly initialised head); {fix}"
        )
    if config.num_labels != 1:
        raise ValueError(f"{where}: num_labels={config.num_labels}, a reward model has num_labels=1; {fix}")
    keys = checkpoint_keys(path, revision)
    head = head_parameter_names(config) if keys else None
    if keys is not None and not keys:
        raise ValueError(f"{where}: no weights (model.safetensors or a shard index) in the folder; {fix}")
    missing = [name for name in head or [] if keys is not None and name not in keys]
    if missing:
        raise ValueError(
            f"{where}: the checkpoint holds no reward head ({', '.join(missing)} missing), so it would be "
            f"initialised randomly; {fix}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as err:
        raise ValueError(f"{where}: cannot load its tokenizer ({err}); {fix}") from err
    if tokenizer.eos_token is None or tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            f"{where}: the reward tokenizer needs an EOS token and a pad token distinct from EOS (pad="
            f"{tokenizer.pad_token!r}, eos={tokenizer.eos_token!r}): the score is read at the last non-pad token, "
            "so pad == eos would skip the EOS the model was trained to score; re-export it with a distinct pad token"
        )
    return tokenizer


def weights_identity(path: str) -> list[list[Any]] | str:
    """``[[file, bytes, mtime_ns], ...]`` of a model folder's weight files; a hub id stands for itself."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    files = sorted(f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
