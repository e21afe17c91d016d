"""The card's architectures from their configs (random weights, no download), and what a recipe asks of them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, GPTNeoConfig, LlamaConfig, PretrainedConfig

ROOT = Path(__file__).resolve().parents[1]
CARD_RECIPES = (
    "recipes/configs/open_llama_3b/sft.yaml",
    "recipes/configs/open_llama_3b/rm.yaml",
    "recipes/configs/gpt_neo_2.7b/raft.yaml",
    "recipes/configs/llama_7b/sft.yaml",
    "recipes/configs/llama_7b/raft.yaml",
)
# The names the card recipes use for their models: hub ids and the card chain's own output folders.
KNOWN = {
    "openlm-research/open_llama_3b": "open_llama_3b",
    "outputs/open_llama_3b/sft": "open_llama_3b",
    "outputs/open_llama_3b/rm": "open_llama_3b",
    "EleutherAI/gpt-neo-2.7B": "gpt_neo_2.7b",
    "huggyllama/llama-7b": "llama_7b",
    "outputs/llama_7b/sft": "llama_7b",
}
# The published configs' shapes (config.json of each hub repository).
FULL: dict[str, dict[str, Any]] = {
    "open_llama_3b": dict(
        family="llama", hidden=3200, layers=26, heads=32, intermediate=8640, vocab=32000, max_pos=2048
    ),
    "llama_7b": dict(family="llama", hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32000, max_pos=2048),
    "gpt_neo_2.7b": dict(
        family="gpt_neo", hidden=2560, layers=32, heads=20, intermediate=4 * 2560, vocab=50257, max_pos=2048
    ),
}
# --scale tiny: the same families (GPT-Neo with a global and a local layer), a few thousand times smaller.
TINY = dict(hidden=64, layers=2, heads=4, vocab=512, max_pos=512)


@dataclass(frozen=True)
class Arch:
    """One model shape: a card architecture at some scale, or a local folder's config.json."""

    name: str
    family: str  # llama | gpt_neo
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_pos: int
    local: str | None = None  # a model folder whose config.json this is

    def config(self, seqcls: bool = False) -> PretrainedConfig:
        if self.local:
            cfg = AutoConfig.from_pretrained(self.local)
        elif self.family == "llama":
            cfg = LlamaConfig(
                vocab_size=self.vocab,
                hidden_size=self.hidden,
                intermediate_size=self.intermediate,
                num_hidden_layers=self.layers,
                num_attention_heads=self.heads,
                num_key_value_heads=self.heads,
                max_position_embeddings=self.max_pos,
                rms_norm_eps=1e-6,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
                tie_word_embeddings=False,
            )
        else:
            window = 256 if self.max_pos >= 2048 else 16
            cfg = GPTNeoConfig(
                vocab_size=self.vocab,
                hidden_size=self.hidden,
                num_layers=self.layers,
                num_heads=self.heads,
                intermediate_size=self.intermediate,
                max_position_embeddings=self.max_pos,
                attention_types=[[["global", "local"], self.layers // 2]],
                window_size=window,
                bos_token_id=self.vocab - 1,
                eos_token_id=self.vocab - 1,
            )
        if seqcls:
            cfg.num_labels = 1
            # GPT-Neo ships no pad token; hhrm's RM sets one, and the score needs it to find each row's last token.
            cfg.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
        cfg.use_cache = True
        return cfg

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def arch_for(model: str, scale: str) -> Arch | None:
    """The shape of ``model`` (a local folder with config.json, or a known card name) at ``scale``; None if neither."""
    folder = Path(model)
    if (folder / "config.json").is_file():
        return local_arch(folder)
    name = KNOWN.get(model)
    if name is None:
        return None
    full = FULL[name]
    if scale == "full":
        return Arch(name=name, **full)
    return Arch(name=name, family=full["family"], intermediate=172 if full["family"] == "llama" else 256, **TINY)


def local_arch(folder: Path) -> Arch:
    cfg = json.loads((folder / "config.json").read_text())
    family = "gpt_neo" if cfg.get("model_type") == "gpt_neo" else "llama"
    hidden = cfg.get("hidden_size", 0)
    return Arch(
        name=folder.name,
        family=family,
        hidden=hidden,
        layers=cfg.get("num_hidden_layers", cfg.get("num_layers", 0)),
        heads=cfg.get("num_attention_heads", cfg.get("num_heads", 0)),
        intermediate=cfg.get("intermediate_size") or 4 * hidden,
        vocab=cfg.get("vocab_size", 0),
        max_pos=cfg.get("max_position_embeddings", 2048),
        local=str(folder),
    )


def read_recipe(path: str) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def recipe_key(path: str) -> str:
    """``open_llama_3b/sft`` for recipes/configs/open_llama_3b/sft.yaml."""
    p = Path(path)
    return f"{p.parent.name}/{p.stem}"


# --------------------------------------------------------------------------------------------
# Counting (meta device: no memory) and building (one model at a time)


def build(arch: Arch, seqcls: bool, dtype: torch.dtype, device: str | torch.device):
    """A randomly initialised model of ``arch`` on ``device`` (``meta``: shapes only)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if seqcls else AutoModelForCausalLM
    cfg = arch.config(seqcls)
    cfg._attn_implementation = "sdpa" if arch.family == "llama" else "eager"
    torch.manual_seed(0)
    with torch.device(device):
        return cls.from_config(cfg, dtype=dtype)


@dataclass(frozen=True)
class Counts:
    params: int  # every parameter (tied weights once)
    matmul: int  # weights of nn.Linear layers (the lm_head too when tied): the N of 2N / 6N FLOPs per token
    largest_block: int  # the largest decoder layer: what ZeRO-3 / FSDP gather at a time


def count(arch: Arch, seqcls: bool) -> Counts:
    model = build(arch, seqcls, torch.float32, "meta")
    params = sum(p.numel() for p in model.parameters())
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    largest = max((sum(p.numel() for p in b.parameters()) for blk in blocks for b in blk), default=0)
    return Counts(params, matmul, largest)
