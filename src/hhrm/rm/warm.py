"""WARM: one reward model whose weights are the (weighted) average of E reward models fine-tuned from one start.

Ramé et al. (2024, "WARM: On the Benefits of Weight Averaged Reward Models"): RMs fine-tuned from one shared start
with other seeds (or orders, or hyperparameters) stay linearly connected, so their weight average is a reward model
that is more robust to over-optimisation than each member, at one model's serving cost (an ensemble of E folders,
:mod:`hhrm.reward.ensemble`, costs E forwards). The average is only meaningful for members of one start: hhrm's RM
export records it in config.json (``reward_start``: the start folder and its weight files), and members of
different starts are refused, as are members that would average different tensors or be scored differently.

:func:`average` writes a normal one-label reward-model folder (safetensors in the members' dtype and file layout,
config.json with ``reward_convention`` and ``reward_start``, the tokenizer, a model card naming the members and
their weights) that every reward source scores (:func:`hhrm.reward.sources.build`). Each tensor is averaged in
fp32 (sum over members of weight x tensor, in member order), then cast back.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hhrm import finite, model_checks, outputs
from hhrm.lifetime import LOCK_FILE

logger = logging.getLogger(__name__)
COPIED = ("generation_config.json",)  # beside the weights, config and tokenizer: kept from member 1 when present


@dataclass
class WarmConfig:
    """Which reward models are averaged, with which weights, and where the averaged folder goes."""

    members: list[str] = field(
        default=None,
        metadata={
            "help": "E >= 2 reward-model folders fine-tuned from one start (e.g. the RM recipe with other seeds: "
            "make rm ARGS='--seed 1 --output_dir ...'), averaged into one (required)."
        },
    )
    weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per member, each >= 0, summing to 1. Default: uniform (1/E)."}
    )
    output_dir: str = field(default=None, metadata={"help": "Folder for the averaged reward model (required)."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace what output_dir holds (else a non-empty output_dir is refused)."}
    )
    assume_same_start: bool = field(
        default=False,
        metadata={
            "help": "Average members whose config.json records no reward_start (RMs exported before hhrm recorded "
            "it, or another tool's): you vouch they were fine-tuned from one start. RMs of different starts share no "
            "basin, and their average is not a reward model."
        },
    )

    def __post_init__(self) -> None:
        finite.check_finite_settings(self)
        members = list(self.members or [])
        if len(members) < 2:
            raise ValueError(
                f"members: WARM averages E >= 2 reward-model folders, got {len(members)}; give the folders of RMs "
                "fine-tuned from one start (--members a b ...)"
            )
        if not self.output_dir:
            raise ValueError("output_dir is required: the folder for the averaged reward model")
        self.members = [str(m) for m in members]
        self.weights = checked_weights(self.weights, len(members))


def checked_weights(weights: list[float] | None, e: int) -> list[float]:
    """The members' weights: uniform when unset; else refused unless one per member, each >= 0, summing to 1."""
    if weights is None:
        return [1.0 / e] * e
    weights = [float(w) for w in weights]
    if len(weights) != e:
        raise ValueError(f"weights: {len(weights)} weights for {e} members; give one per member (or none: uniform)")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights={weights}: each must be >= 0 (a weight average, not an extrapolation)")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"weights={weights}: sum to {sum(weights):.6g}, must sum to 1 (e.g. 0.5 0.25 0.25)")
    return weights


# --------------------------------------------------------------------------------------------
# What the members must share (read from their files; nothing is loaded)


def read_config(folder: str) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text())


def weight_files(folder: str, setting: str) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{setting}={folder!r}: no safetensors weights; WARM reads safetensors folders (re-save the model with "
            "save_pretrained, which writes them)"
        )
    return files


def header(files: list[Path]) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """``{tensor: (file name, dtype, shape)}`` from the safetensors headers."""
    out = {}
    for path in files:
        with open(path, "rb") as f:
            head = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, t in head.items():
            if name != "__metadata__":
                out[name] = (path.name, t["dtype"], tuple(t["shape"]))
    return out


def check_starts(members: list[str], configs: list[dict], assume_same_start: bool) -> None:
    """Refuse members fine-tuned from different starts, or without the record unless ``assume_same_start``."""
    starts = [c.get("reward_start") for c in configs]
    missing = [f"members[{i}]={m!r}" for i, (m, s) in enumerate(zip(members, starts)) if not s]
    if missing and not assume_same_start:
        raise ValueError(
            f"{', '.join(missing)}: config.json records no reward_start (the model it was fine-tuned from), so WARM "
            "cannot tell that the members share one start; re-export with `make rm`, or pass --assume_same_start "
            "true if you know they do"
        )
    known = [(i, s) for i, s in enumerate(starts) if s]
    for i, start in known[1:]:
        first, ref = known[0]
        if start != ref:
            differ = (
                f"reward_start models {start.get('model')!r} vs {ref.get('model')!r}"
                if start.get("model") != ref.get("model")
                else f"the weight files of {ref.get('model')!r} changed between their trainings"
            )
            raise ValueError(
                f"members[{i}]={members[i]!r} was fine-tuned from another start than members[{first}] ({differ}): "
                "WARM averages RMs of one start only (their average is not a reward model otherwise); train every "
                "member from the same start"
            )


def check_shapes(members: list[str], configs: list[dict], headers: list[dict]) -> None:
    """Refuse members of other architectures, tensors, shapes or dtypes than member 0."""
    keys = ("architectures", "model_type", "num_labels")
    for i, (config, head) in enumerate(zip(configs[1:], headers[1:]), start=1):
        where = f"members[{i}]={members[i]!r}"
        for key in keys:
            if config.get(key) != configs[0].get(key):
                raise ValueError(
                    f"{where}: {key} {config.get(key)!r}, members[0] has {configs[0].get(key)!r}; WARM averages "
                    "models of one architecture"
                )
        names = sorted(set(head) ^ set(headers[0]))
        if names:
            raise ValueError(
                f"{where}: holds other tensors than members[0] ({', '.join(names[:3])}"
                f"{', ...' if len(names) > 3 else ''}); WARM averages models of one architecture"
            )
        for name, (_, dtype, shape) in head.items():
            _, dtype0, shape0 = headers[0][name]
            if (dtype, shape) != (dtype0, shape0):
                raise ValueError(
                    f"{where}: tensor {name} is {dtype} {list(shape)}, in members[0] {dtype0} {list(shape0)}; WARM "
                    "averages models of one shape and dtype (train every member by one recipe)"
                )


def check_members(args: WarmConfig) -> tuple[Any, list[dict], dict]:
    """Every refusal before any weight is read: the folders (reward models, one convention, one tokenizer, one start,
    one shape). Returns member 0's tokenizer, the configs and member 0's header."""
    from hhrm.reward import ensemble, sources

    local = [sources.LocalModel(m, setting=f"members[{i}]") for i, m in enumerate(args.members)]
    ensemble.check_members(local, setting="members")  # one convention, one tokenizer
    configs = [read_config(m) for m in args.members]
    check_starts(args.members, configs, args.assume_same_start)
    headers = [header(weight_files(m, f"members[{i}]")) for i, m in enumerate(args.members)]
    check_shapes(args.members, configs, headers)
    return local[0].tokenizer, configs, headers[0]


def check_output(args: WarmConfig) -> Path:
    """Refuse an output_dir that holds anything (unless overwrite_output_dir) or is a member; lock it."""
    out = Path(args.output_dir)
    if any(out.resolve() == Path(m).resolve() for m in args.members):
        raise ValueError(f"output_dir={args.output_dir!r} is one of the members: choose a new output_dir")
    held = sorted(p.name for p in out.iterdir() if p.name not in (LOCK_FILE, outputs.STAGING)) if out.is_dir() else []
    if held and not args.overwrite_output_dir:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ValueError(
            f"output_dir={args.output_dir!r} is not empty ({shown}); choose a new output_dir, or pass "
            "--overwrite_output_dir true to replace it"
        )
    return outputs.check_output_dir(out, "warm", overwrite=True)


# --------------------------------------------------------------------------------------------
# The average


def average_tensors(members: list[str], weights: list[float], names: list[str]) -> dict[str, Any]:
    """``{name: sum_e weights[e] * tensor_e}`` in fp32 (member order), cast back to the members' dtype."""
    import torch
    from safetensors import safe_open

    handles = {}
    try:
        for m in members:
            for path in weight_files(m, "members"):
                handles[(m, path.name)] = safe_open(str(path), framework="pt")
        where = {m: {n: f for f in weight_files(m, "members") for n in handles[(m, f.name)].keys()} for m in members}
        out = {}
        for name in names:
            tensors = [handles[(m, where[m][name].name)].get_tensor(name) for m in members]
            if not tensors[0].is_floating_point():  # integer buffers (position ids): equal in every member
                out[name] = tensors[0]
                continue
            acc = torch.zeros(tensors[0].shape, dtype=torch.float32)
            for w, t in zip(weights, tensors):
                acc += w * t.to(torch.float32)
            out[name] = acc.to(tensors[0].dtype)
        return out
    finally:
        handles.clear()


def average(args: WarmConfig) -> Path:
    """Check the members (refusals first), average them into ``args.output_dir`` (written whole, or not at all)."""
    from safetensors.torch import save_file

    tokenizer, configs, head = check_members(args)
    out = check_output(args)
    need = sum(f.stat().st_size for f in weight_files(args.members[0], "members[0]"))
    outputs.check_free_space(out, need, "the averaged model")
    try:
        with outputs.staged(out) as folder:
            layout: dict[str, list[str]] = {}
            for name, (file, _, _) in head.items():
                layout.setdefault(file, []).append(name)
            for file, names in sorted(layout.items()):  # member 0's files, one at a time: memory of one shard
                save_file(average_tensors(args.members, args.weights, names), folder / file, {"format": "pt"})
            first = Path(args.members[0])
            for name in ["model.safetensors.index.json", *COPIED]:
                if (first / name).is_file():
                    shutil.copy(first / name, folder / name)
            agreement = head_agreement(args.members)
            record = {"members": args.members, "weights": args.weights, "head_cosine_min": agreement}
            config = configs[0] | {"warm": record}
            (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            tokenizer.save_pretrained(folder)
            (folder / "README.md").write_text(card(args, configs[0], agreement), encoding="utf-8")
        model_checks_ok(out)
    finally:
        outputs.release_output_dir(out)
    return out


def head_agreement(members: list[str]) -> float | None:
    """The least cosine between two members' reward heads (None: the head is unknown). Far below 1: the heads were
    initialised apart (the RM stage draws its head from the seed), and their average keeps little of either, so it
    is logged: WARM's members share their head's start too (the paper's linear-probed start)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    names = model_checks.head_parameter_names(AutoConfig.from_pretrained(members[0]))
    if not names:
        return None
    heads = []
    for m in members:
        parts = []
        for path in weight_files(m, "members"):
            with safe_open(str(path), framework="pt") as f:
                parts += [f.get_tensor(n).to(torch.float64).flatten() for n in names if n in f.keys()]
        heads.append(torch.cat(parts))
    least = min(float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a in heads for b in heads)
    if least < 0.5:
        logger.warning(
            "members' reward heads point apart (least pairwise cosine %.2f): they were initialised apart (other "
            "seeds), so their average keeps little of each; WARM wants members of one start, head included",
            least,
        )
    return round(least, 4)


def model_checks_ok(out: Path) -> None:
    """The averaged folder as shared (permissions, no pickle), and a reward model by hhrm's own check."""
    from hhrm import modeling

    modeling.finish_export(out)
    model_checks.check_reward_model(str(out), "output_dir")


def card(args: WarmConfig, config: dict, agreement: float | None) -> str:
    start = (config.get("reward_start") or {}).get("model", "not recorded (assume_same_start)")
    rows = "\n".join(f"| {i} | `{m}` | {w:.6g} |" for i, (m, w) in enumerate(zip(args.members, args.weights)))
    convention = config.get("reward_convention", "not recorded")
    return f"""---
library_name: transformers
tags: [reward-model, warm, hhrm]
---

# WARM reward model: the weight average of {len(args.members)} reward models

Each tensor is the weighted average of the members' (in fp32, saved in their dtype), after Ramé et al. (2024),
"WARM: On the Benefits of Weight Averaged Reward Models": one model's serving cost. Made by hhrm
(`make warm-rm`, `recipes/warm_rm.py`).

| member | folder | weight |
|---|---|---|
{rows}

- Start every member was fine-tuned from (`reward_start`): `{start}`
- Least cosine between two members' reward heads: {agreement} (near 1: one head init; near 0: heads initialised
  apart, e.g. other seeds, whose average keeps little of each)
- Scored by `reward_convention={convention}` (recorded in config.json, as the members'): `make score MODEL=<this
  folder> ...`, `make serve-rm MODEL=<this folder>`, or `reward_model_name_or_path` in RAFT and `make overopt`.
"""
