"""Loading tokenizers and models from TRL's ``ModelConfig`` (paths checked first by :mod:`hhrm.model_checks`); saving
merged, loadable folders; ZeRO-3 gathers."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from trl import ModelConfig, get_quantization_config

from hhrm import outputs
from hhrm.model_checks import check_model_path

logger = logging.getLogger(__name__)


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
    made for sharing (:func:`finish_export`): readable by all, no ``training_args.bin`` pickle. A full disk is one
    line naming the folder and the model's size (:func:`hhrm.outputs.space_errors`).
    """
    output_dir = Path(output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    with outputs.space_errors(output_dir, outputs.model_bytes(model), "the model", setting=None):
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
