"""Model folders checked before anything is loaded: model paths (a local folder or a hub id), the weights a
checkpoint holds (read from safetensors headers, no tensor loaded), reward-model folders, and the identity of a
model's weight files (RAFT's resume fingerprint, the server's /info)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from hhrm.hub import hub_reachable, offline_variable
from hhrm.runtime import whole_models
from hhrm.weight_files import check_weight_files

logger = logging.getLogger(__name__)

# A hub id: ``owner/name`` (letters, digits, ``-``, ``_``, ``.``), never a path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# This project's output root (every recipe's output_dir): a path under it is a missing stage, never a hub id.
OUTPUT_ROOT = "outputs"


class ModelPathError(FileNotFoundError, ValueError):
    """A model path that is neither a local folder nor a reachable hub id (a ``FileNotFoundError`` and a
    ``ValueError``, so callers catching either see it)."""


def hub_offline() -> bool:
    """Whether the hub must not be contacted (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return offline_variable() is not None


def check_model_path(
    path: str | Path | None,
    setting: str = "model_name_or_path",
    hint: str = "point it at a local model folder or a hub id (owner/name)",
    revision: str | None = None,
) -> str:
    """``"local"`` or ``"hub"``; raises :class:`ModelPathError` (naming ``setting``) for anything else.

    Local when the path exists (it must be a folder, and its weight files must be whole: a ``ValueError`` from
    :func:`hhrm.weight_files.check_weight_files` otherwise). A hub id only when it has the ``owner/name`` shape, does
    not start with ``.``, ``/`` or ``~``, and its first component is neither an existing local folder nor
    ``outputs`` (then it is a missing folder, not a hub id, and ``from_pretrained`` would spend a minute in
    hub retries); and only when it is in the local hub cache or the hub can be contacted (not offline, reachable).
    """
    if not path:
        raise ModelPathError(f"{setting} is not set: {hint}")
    text = str(path)
    local = Path(text).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelPathError(f"{setting}={text!r} is a file, not a model folder: {hint}")
        check_weight_files(local, f"{setting}={text!r}")
        return "local"
    first = text.split("/")[0]
    if (
        text.startswith((".", "/", "~"))
        or not HUB_ID.fullmatch(text)
        or first == OUTPUT_ROOT
        or Path(first).expanduser().is_dir()
    ):
        raise ModelPathError(f"{setting}={text!r}: no such folder (and not a hub id of the form owner/name); {hint}")
    if _in_hub_cache(text, revision):
        return "hub"
    offline = offline_variable()
    if offline or not hub_reachable():
        from huggingface_hub import constants

        why = f"{offline}=1 forbids downloading it" if offline else f"the hub ({constants.ENDPOINT}) cannot be reached"
        raise ModelPathError(
            f"{setting}={text!r}: no such local folder ({local.absolute()}), and not a reachable hub id: {why}, and "
            f"it is not in the local hub cache; {hint}{f', or unset {offline}' if offline else ''}"
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
        with whole_models(), torch.device("meta"):  # under ZeRO-3, not partitioned by deepspeed.zero.Init
            model = AutoModelForSequenceClassification.from_config(config)
    except Exception as err:  # custom code, an unknown architecture: the head is not checked
        logger.warning("cannot build %s on the meta device (%s): reward head not checked", type(config).__name__, err)
        return None
    prefix = f"{model.base_model_prefix}."
    return [name for name, _ in model.named_parameters() if not name.startswith(prefix)]


def model_config(
    path: str | Path | None, setting: str, fix: str, revision: str | None = None, trust_remote_code: bool = False
) -> tuple[str | Path, Any]:
    """``(path, config)`` of a model folder or hub id, refused in one line naming ``setting`` and ``fix`` when the
    path does not exist, a local folder has no config.json, or the config cannot be read."""
    from transformers import AutoConfig

    where = f"{setting}={str(path)!r}"
    if check_model_path(path, setting, fix, revision) == "local":
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelPathError(f"{where}: no config.json there, so not a model folder; {fix}")
    try:
        return path, AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ValueError(f"{where}: cannot read its config ({err}); {fix}") from err


def reward_heads(path: str | Path | None) -> int:
    """The score heads a reward-model folder records (config.json ``reward_heads``: hhrm's multi-head ensemble RM),
    read without loading anything; 1 for any other folder, or when it cannot be read (its checks refuse it later)."""
    try:
        config = json.loads((Path(str(path)).expanduser() / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return 1
    heads = config.get("reward_heads", 1) if isinstance(config, dict) else 1
    return heads if isinstance(heads, int) and heads >= 1 else 1


def check_reward_model(
    path: str | Path | None, setting: str = "reward_model_name_or_path", revision: str | None = None
) -> PreTrainedTokenizerBase:
    """Refuse, with a ``ValueError`` naming ``setting``, a folder that is not a reward model; returns its tokenizer.

    A reward model folder (the RM recipe's output) has a config.json whose ``architectures`` is a
    ``*ForSequenceClassification`` with ``num_labels == 1`` (or the E heads it records, :func:`reward_heads`),
    weights that hold that head (read from the safetensors headers, nothing is loaded), and a tokenizer with a
    pad token. A causal LM would otherwise be scored by a randomly initialised head, and RAFT would fine-tune against
    noise. Whether pad == EOS can work depends on how the model is scored: :func:`hhrm.reward.conventions.resolve`
    judges that.
    """
    fix = "point it at a reward model folder (the output of recipes/rm.py, `make rm`)"
    where = f"{setting}={str(path)!r}"
    path, config = model_config(path, setting, fix, revision)
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(
            f"{where} is a {'/'.join(architectures) or 'model without architectures in its config'}, not a reward "
            f"model: a *ForSequenceClassification with num_labels=1 is needed (a causal LM would be scored by a "
            f"randomly initialised head); {fix}"
        )
    if config.num_labels != getattr(config, "reward_heads", 1):  # hhrm's multi-head RM records its E heads
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
    if tokenizer.pad_token is None:  # whether it needs an EOS is its convention's to say (an encoder has none)
        raise ValueError(
            f"{where}: the reward tokenizer has no pad token (eos={tokenizer.eos_token!r}): the scorer pads batches; "
            f"set one in the folder's tokenizer (tokenizer.save_pretrained); {fix}"
        )
    return tokenizer


# --------------------------------------------------------------------------------------------
# Policy folders: a causal LM whose every weight is in its checkpoint, checked before anything is loaded

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
POLICY_FIX = "point it at a causal LM folder (a *ForCausalLM, such as recipes/sft.py's output) or a hub id of one"


def is_causal_lm(architectures: list[str]) -> bool:
    """Whether one of ``architectures`` is what ``AutoModelForCausalLM`` builds (``*ForCausalLM``, GPT-2's
    ``GPT2LMHeadModel``, and every other class of its mapping)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    known = {
        n
        for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        for n in ([names] if isinstance(names, str) else names)
    }
    return any(a in known or a.endswith(CAUSAL_LM_SUFFIXES) for a in architectures)


def check_causal_lm(
    path: str | Path | None,
    setting: str = "model_name_or_path",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Refuse, with a ``ValueError`` naming ``setting``, a policy that is not a causal LM whose weights all load.

    ``AutoModelForCausalLM.from_pretrained`` loads a reward model (or a checkpoint lacking a weight) with randomly
    initialised weights, and only its load report says so: the "policy" would generate noise, be fine-tuned and
    exported. The config's ``architectures`` must name a causal LM; where the checkpoint's parameter names can be
    read (safetensors headers, no tensor loaded) each parameter of that causal LM must be there
    (:func:`missing_parameters`). A hub id whose metadata cannot be read gets the architecture check only.
    """
    where = f"{setting}={str(path)!r}"
    path, config = model_config(path, setting, POLICY_FIX, revision, trust_remote_code)
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not is_causal_lm(architectures):
        reward = any(a.endswith("ForSequenceClassification") for a in architectures)
        raise ValueError(
            f"{where} is a {'/'.join(architectures)}{' (a reward model)' if reward else ''}, not a causal LM: loaded "
            f"as the policy, its lm_head would be initialised randomly and it would generate noise; {POLICY_FIX}"
        )
    keys = checkpoint_keys(path, revision)
    if keys is not None and not keys:
        raise ValueError(f"{where}: no weights (model.safetensors or a shard index) in the folder; {POLICY_FIX}")
    missing = missing_parameters(config, keys, trust_remote_code) if keys else []
    if missing:
        raise ValueError(
            f"{where}: the checkpoint lacks {len(missing)} of the causal LM's parameters ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}), which would be initialised randomly; {POLICY_FIX}"
        )


def check_policy(model_args: Any, trust_remote_code: bool = False, setting: str = "model_name_or_path") -> None:
    """:func:`check_causal_lm` of a TRL ``ModelConfig``'s model: ``model_name_or_path`` at ``model_revision``."""
    check_causal_lm(model_args.model_name_or_path, setting, model_args.model_revision, trust_remote_code)


def missing_parameters(config, keys: set[str], trust_remote_code: bool = False) -> list[str]:
    """The parameters of ``config``'s causal LM (built on the meta device: nothing is allocated) that ``keys`` lacks.

    A tied ``lm_head`` (``tie_word_embeddings``) is the embeddings' tensor, stored once under either name; names are
    matched with and without the base model's prefix, as ``from_pretrained`` does; buffers are not weights. Nothing
    is reported where the names cannot be compared: quantized checkpoints, models whose loading renames or fuses
    weights (transformers' conversion mappings), a checkpoint with none of the model's names, a model that cannot
    be built on the meta device.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if getattr(config, "quantization_config", None):
        return []
    try:
        with whole_models(), torch.device("meta"):  # under ZeRO-3, not partitioned by deepspeed.zero.Init
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as err:  # custom code, an unknown architecture: the weights are not checked
        logger.warning(
            "cannot build %s on the meta device (%s): its weights are not checked", type(config).__name__, err
        )
        return []
    if _renames_weights(model):
        return []
    prefix = f"{model.base_model_prefix}."
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    tied: dict[int, list[str]] = {}  # one tensor, all its names
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    missing, found = [], 0
    for names in tied.values():
        if any(n in keys or n.removeprefix(prefix) in keys for n in names):
            found += 1
        elif not any(p.search(n) for p in ignored for n in names):
            missing.append(names[0])
    return missing if found else []


def _renames_weights(model) -> bool:
    """Whether transformers renames or fuses this model's checkpoint weights when loading (e.g. MoE experts)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        return bool(get_model_conversion_mapping(model, add_legacy=False))
    except (ImportError, TypeError):  # a transformers without conversion mappings loads names as stored
        return False


def weights_identity(path: str) -> list[list[Any]] | str:
    """``[[file, bytes, mtime_ns], ...]`` of a model folder's weight files; a hub id stands for itself."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    files = sorted(f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
