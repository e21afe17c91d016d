"""Loading tokenizers and models from TRL's ``ModelConfig``; checking model paths and reward-model folders before
anything is loaded; saving merged, loadable folders."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from trl import ModelConfig, get_quantization_config

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


def trust_remote_code(model_args: ModelConfig, args: Any = None) -> bool:
    """The one ``trust_remote_code`` rule: TRL 1.16 keeps the flag on the training config (``SFTConfig``,
    ``RewardConfig``, hence ``--trust_remote_code``); a ``ModelConfig`` that carries one counts too."""
    return bool(getattr(args, "trust_remote_code", False) or getattr(model_args, "trust_remote_code", False))


def load_tokenizer(model_args: ModelConfig, padding_side: str = "right", args: Any = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token that is not EOS.

    ``model_name_or_path`` is checked first (:func:`check_model_path`). ``args``: the stage's training config,
    whose ``trust_remote_code`` reaches the tokenizer as it reaches the model (:func:`model_init_kwargs`).

    pad == EOS breaks reward models (the scored token is the last non-pad one, so an appended EOS
    would be skipped) and hides EOS from SFT labels. Tokenizers without a pad token (LLaMA, GPT-Neo)
    get their ``unk`` token as pad when it exists and is distinct, else an added ``<pad>`` token
    (the model's embeddings are resized by :func:`match_vocab`).
    """
    check_model_path(model_args.model_name_or_path, revision=model_args.model_revision)
    tok = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=trust_remote_code(model_args, args),
    )
    if tok.eos_token is None:
        raise ValueError(f"{model_args.model_name_or_path}: the tokenizer has no eos_token; set one in its config")
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        if tok.unk_token is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
        logger.warning("%s: no distinct pad token, using %r", model_args.model_name_or_path, tok.pad_token)
    tok.padding_side = padding_side
    return tok


def match_vocab(model, tokenizer) -> None:
    """Resize embeddings if the tokenizer grew (an added pad token); record the pad id in the configs and in
    the input embedding's ``padding_idx``.

    ``nn.Embedding(padding_idx=config.pad_token_id)`` never updates that row; a checkpoint whose config says
    pad == EOS would otherwise freeze the EOS embedding, the token the reward is read at.
    """
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    embeddings = model.get_input_embeddings()
    if hasattr(embeddings, "padding_idx"):
        embeddings.padding_idx = tokenizer.pad_token_id


def model_init_kwargs(model_args: ModelConfig, training_args: Any) -> dict[str, Any]:
    """``from_pretrained`` kwargs: dtype, attention, remote code, and quantization (bitsandbytes) if asked."""
    kwargs: dict[str, Any] = dict(
        revision=model_args.model_revision,
        trust_remote_code=trust_remote_code(model_args, training_args),
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype or "float32",
    )
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = kbit_device_map()
    if getattr(training_args, "model_init_kwargs", None):
        kwargs.update(training_args.model_init_kwargs)
    return {k: v for k, v in kwargs.items() if v is not None}


def kbit_device_map() -> dict[str, Any]:
    """Quantized weights live on this process's device (one full copy per DDP rank)."""
    import torch
    from accelerate import PartialState

    return {"": PartialState().local_process_index if torch.cuda.is_available() else "cpu"}


# --------------------------------------------------------------------------------------------
# Saving


def save_merged(trainer, output_dir: str | Path, tokenizer) -> Path:
    """Save a plain model folder: LoRA adapters are merged so ``from_pretrained`` needs no peft.

    Full fine-tunes go through ``trainer.save_model``, which gathers ZeRO-3/FSDP shards. The folder is then
    made for sharing (:func:`finish_export`): readable by all, no ``training_args.bin`` pickle.
    """
    output_dir = Path(output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        merged = model.merge_and_unload()
        if trainer.accelerator.is_main_process:
            merged.save_pretrained(output_dir, safe_serialization=True)
    else:
        trainer.save_model(str(output_dir))
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
        finish_export(output_dir)
    trainer.accelerator.wait_for_everyone()
    return output_dir


def finish_export(folder: str | Path) -> None:
    """An exported model folder as it is shared: every file at least 0644 and every folder at least 0755
    (else what the umask gives new files: safetensors writes weights 0600, unreadable to a server running
    under another uid), and no ``training_args.bin`` (a pickle ``Trainer.save_model`` drops beside the weights).

    Trainer checkpoints below it (``checkpoint-*``, what ``resume_from_checkpoint`` reads) are left as they are;
    links are not followed.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    umask = os.umask(0)
    os.umask(umask)
    file_mode, dir_mode = (0o666 & ~umask) | 0o644, (0o777 & ~umask) | 0o755
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(f"{PREFIX_CHECKPOINT_DIR}-")]
        _add_mode(Path(root), dir_mode)
        for name in files:
            path = Path(root, name)
            if path.is_symlink():
                continue
            if name == "training_args.bin":
                path.unlink()
            else:
                _add_mode(path, file_mode)


def _add_mode(path: Path, mode: int) -> None:
    current = path.stat().st_mode & 0o7777
    if current | mode != current:
        path.chmod(current | mode)


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


# --------------------------------------------------------------------------------------------
# ZeRO-3


def zero3_partitioned(model) -> bool:
    """Whether ``model`` holds only this rank's ZeRO-3 shard of its parameters.

    Under a ZeRO-3 launch with ``zero3_init_flag``, ``from_pretrained`` partitions every model it
    loads, also those no trainer wraps (RAFT's policy before its first fine-tune, the reward model):
    their weights are empty on each rank until gathered.
    """
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def full_parameters(model) -> Iterator[Any]:
    """``model`` with all its parameters present on every rank for the duration (inference only).

    A collective under ZeRO-3: every rank must enter it, also one with nothing to compute. It is
    re-entrant (an inner call gathers nothing), so a caller that works in a rank-dependent number of
    chunks wraps them all in one call.
    """
    if not zero3_partitioned(model) or getattr(model, "_hhrm_full_parameters", False):
        yield model
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        model._hhrm_full_parameters = True
        try:
            yield model
        finally:
            model._hhrm_full_parameters = False


def weights_identity(path: str) -> list[list[Any]] | str:
    """``[[file, bytes, mtime_ns], ...]`` of a model folder's weight files; a hub id stands for itself."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    files = sorted(f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
