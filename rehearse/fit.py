"""Computed memory per device: parameters, gradients, optimizer state and activations of each stage and launch path.

Bytes per parameter (P parameters, N processes, AdamW's two fp32 moments):

* one device / DDP, bf16 mixed (Trainer ``bf16: true`` keeps fp32 weights and autocasts): fp32 weights 4P, fp32
  gradients 4P, moments 8P (DDP adds its fp32 gradient buckets, 4P: ``gradient_as_bucket_view`` is off);
  on a CPU hhrm trains in fp32, the same 16P.
* DeepSpeed ZeRO-2, bf16: bf16 weights 2P, bf16 gradients 2P/N, fp32 master weights + moments 12P/N.
* DeepSpeed ZeRO-3, bf16: 2P/N weights plus the layers gathered for compute (two of the largest, prefetch), 2P/N
  gradients, 12P/N master + moments.
* FSDP2 (accelerate's ``mixed_precision: bf16``): fp32 shards 4P/N, fp32 gradient shards 4P/N, moments 8P/N, plus
  two largest layers unsharded in bf16.

Activations per micro-batch (b rows of s tokens, a bytes per activation value): with activation checkpointing each
layer keeps its input (L b s h a) and one layer at a time is recomputed; without it every layer keeps its own.
A layer's saved values per token: attention ~11h (norm, q/k/v, rotary copies, output), the MLP 2h + 4I (Llama's
gate/up/act/product) or 2h + 12h (GPT-Neo's gelu_new on 4h); GPT-Neo's eager attention also keeps b x heads x s x s
scores (fp32). The causal LM head keeps b s V logits (a bytes, an fp32 copy and the log-softmax: a + 8).
Generation holds the weights and the KV cache (2 L n (p + t) h a) plus the prefill's live values (4h + 2I per token,
no autograd) and the last token's logits; scoring the weights and one forward's live values. Optimizer temporaries,
the CUDA context and allocator fragmentation are not counted: a row fits when its total is at most 90% of the
device's memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .models import Arch, Counts

GB = 1e9
DEVICE_GB = (24, 40, 80, 141)
HEADROOM = 0.9
CONFIGS = {  # accelerate config -> (memory scheme, processes in the config)
    "single device": ("single", 1),
    "multi_gpu.yaml (DDP)": ("ddp", 8),
    "deepspeed_zero2.yaml": ("zero2", 8),
    "deepspeed_zero3.yaml": ("zero3", 8),
    "fsdp.yaml": ("fsdp", 8),
}


@dataclass
class Memory:
    params: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations

    def as_gb(self) -> dict[str, float]:
        parts = dict(params=self.params, grads=self.grads, optimizer=self.optimizer, activations=self.activations)
        return {k: round(v / GB, 4) for k, v in (parts | {"total": self.total}).items()}


def layer_values(arch: Arch) -> int:
    """Saved activation values per token of one decoder layer (see the module docstring)."""
    h, i = arch.hidden, arch.intermediate
    return 11 * h + (2 * h + 4 * i if arch.family == "llama" else 2 * h + 3 * i)


def live_values(arch: Arch) -> int:
    """Values per token alive at once in a forward without autograd: the residual stream and a few temporaries."""
    return 4 * arch.hidden + 2 * arch.intermediate


def scores_bytes(arch: Arch, rows: int, s: int, a: int) -> float:
    """GPT-Neo's eager attention materialises fp32 scores and their softmax; Llama runs sdpa (no s x s kept)."""
    return rows * arch.heads * s * s * (4 + a) if arch.family == "gpt_neo" else 0.0


def activations(arch: Arch, rows: int, s: int, a: int, checkpointing: bool, lm_head: bool) -> float:
    tokens = rows * s
    layer = tokens * layer_values(arch) * a + scores_bytes(arch, rows, s, a)
    kept = arch.layers * tokens * arch.hidden * a + layer if checkpointing else arch.layers * layer
    logits = tokens * arch.vocab * (a + 8) if lm_head else 0.0
    return kept + logits


def training(
    arch: Arch, counts: Counts, scheme: str, n: int, rows: int, s: int, a: int, checkpointing: bool, lm_head: bool
) -> Memory:
    """Per-device memory of one training step of ``rows`` x ``s`` tokens under ``scheme`` over ``n`` processes."""
    p = counts.params
    gathered = 2 * counts.largest_block * 2  # two bf16 layers in flight (ZeRO-3 prefetch, FSDP's next unshard)
    params, grads, opt = {
        "single": (4 * p, 4 * p, 8 * p),
        "ddp": (4 * p, 8 * p, 8 * p),
        "zero2": (2 * p, 2 * p / n, 12 * p / n),
        "zero3": (2 * p / n + gathered, 2 * p / n, 12 * p / n),
        "fsdp": (4 * p / n + gathered, 4 * p / n, 8 * p / n),
    }[scheme]
    return Memory(params, grads, opt, activations(arch, rows, s, a, checkpointing, lm_head))


def generation(arch: Arch, counts: Counts, seqs: int, prompt: int, new: int, a: int) -> Memory:
    """The whole policy on every device (offload_models: each generate stage loads the saved policy whole)."""
    kv = 2 * arch.layers * seqs * (prompt + new) * arch.hidden * a
    prefill = seqs * prompt * live_values(arch) * a + scores_bytes(arch, seqs, prompt, a) + seqs * arch.vocab * 8
    return Memory(counts.params * a, 0.0, 0.0, kv + prefill)


def scoring(arch: Arch, counts: Counts, texts: int, s: int, a: int) -> Memory:
    """The whole reward model on every device (RewardScorer), one layer's forward of ``texts`` x ``s`` tokens."""
    return Memory(counts.params * a, 0.0, 0.0, texts * s * live_values(arch) * a + scores_bytes(arch, texts, s, a))


def fit_rows(card: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each card recipe x accelerate config: the heaviest stage's memory per device and whether it fits.

    ``card``: per recipe its training stage (arch, counts, micro-batch rows and tokens, checkpointing, LM head) and
    its inference stages' memory (RAFT: generate and score, the same on every config: whole models per device).
    """
    rows = []
    for r in card:
        for config, (scheme, n) in CONFIGS.items():
            mem = training(r["arch"], r["counts"], scheme, n, r["rows"], r["seq"], 2, r["checkpointing"], r["lm_head"])
            heaviest, stage = mem, r["train_stage"]
            for name, other in r.get("inference", {}).items():
                if other.total > heaviest.total:
                    heaviest, stage = other, name
            rows.append(
                {
                    "recipe": r["recipe"],
                    "model": r["arch"].name,
                    "params_b": round(r["counts"].params / 1e9, 3),
                    "config": config,
                    "processes": n,
                    "micro_batch": f"{r['rows']} x {r['seq']}",
                    "activation_checkpointing": r["checkpointing"],
                    "heaviest_stage": stage,
                    "gb_per_device": heaviest.as_gb(),
                    "fits": {str(g): heaviest.total <= HEADROOM * g * GB for g in DEVICE_GB},
                }
            )
    return rows
