"""A reward ensemble of E whole RMs (``ensemble_kind=seeds``): the same recipe with seeds seed..seed+E-1.

Member e is a normal RM folder, ``output_dir/member-<e>`` (its own metrics, card and evaluation), trained by the
recipe's own ``main`` with ``seed + e``: the head's initialisation and the batch order differ (Coste et al. 2023's
ensembles). When all are done, ``output_dir/ensemble.json`` (:data:`hhrm.reward.ensemble.RECORD`) lists them, and
``reward_ensemble: [output_dir]`` (or ``reward_model_name_or_path: output_dir``) scores them as one ensemble.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hhrm import reporting
from hhrm.reward import ensemble

MEMBER = "member-{}"


def member_args(args, e: int):
    """Member ``e``'s config: one RM (ensemble_size=1) into ``output_dir/member-<e>`` with ``seed + e``."""
    mine = copy.deepcopy(args)
    mine.output_dir = str(Path(args.output_dir) / MEMBER.format(e))
    mine.seed, mine.ensemble_size = args.seed + e, 1
    return mine


def train(train_one: Callable[..., dict], data_args, args, model_args) -> dict[str, Any]:
    """Train the E members in sequence by ``train_one`` (the recipe's one-RM ``main``); write the record."""
    members = []
    for e in range(args.ensemble_size):
        mine = member_args(args, e)
        metrics = train_one(data_args, mine, copy.deepcopy(model_args))
        members.append({"folder": MEMBER.format(e), "seed": mine.seed, "metrics": metrics})
    return write_record(args, members)


def write_record(args, members: list[dict[str, Any]]) -> dict[str, Any]:
    """``output_dir/ensemble.json``: the member folders (relative), their seeds and held-out accuracies."""
    accuracy = [m["metrics"].get("eval_accuracy_exact") for m in members]
    record = {
        "kind": "seeds",
        "members": [m["folder"] for m in members],
        "seeds": [m["seed"] for m in members],
        "eval_accuracy_exact": accuracy,
    }
    if args.process_index == 0:
        reporting.write_json(record, Path(args.output_dir) / ensemble.RECORD)
    return record


def read_record(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / ensemble.RECORD).read_text())
