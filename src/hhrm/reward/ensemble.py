"""A reward ensemble as one reward source: E reward-model folders scored alike, one reward per text by a rule.

Coste et al. (2023, "Reward Model Ensembles Help Mitigate Overoptimization") train E reward models by one recipe
with other seeds and select by a conservative aggregate of their rewards. Per text, with member rewards r_1..r_E:

- ``mean``: (1/E) sum r_e;
- ``worst``: min_e r_e (their WCO);
- ``uwo``: mean - lambda * var, var = (1/E) sum (r_e - mean)^2 (their UWO; lambda 0.5 is their best-of-n value).

``std`` is sqrt(var), the same population statistic. Members are reward-model sources, E in all: a folder counts as
its heads (hhrm's multi-head RM, ``ensemble_kind=heads``: one backbone, E bootstrapped score heads, all from one
forward), and a folder holding :data:`RECORD` (the RM recipe's ``ensemble_kind=seeds`` output) expands to the member
folders it lists; a multi-head or seeds folder given as ``reward_model_name_or_path`` is such an ensemble too.
The member folders are built by
:class:`hhrm.reward.sources.LocalModel`; they must read the same token ids at the same position (one convention,
one tokenizer), else the ensemble would average rewards of different texts, so that is refused when built.
:class:`Ensemble` has the source's five methods (``make overopt``, ``make score``, RAFT, ``make compare`` get it
through :func:`hhrm.reward.sources.build`) and ``score_members``: the members, mean and std per text.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np

AGGREGATIONS = ("mean", "worst", "uwo")
RECORD = "ensemble.json"  # the RM recipe's ensemble_kind=seeds record: {"kind": "seeds", "members": [...]}
COLUMNS = ("mean", "std", "members")  # make score: per reward column c, also c_mean, c_std, c_members


def expand(paths: list) -> list[str]:
    """The member folders ``paths`` name: a folder holding :data:`RECORD` stands for the folders it lists."""
    out: list[str] = []
    for path in map(str, paths):
        record = Path(path).expanduser() / RECORD
        if record.is_file():
            out += [str(Path(path) / m) for m in json.loads(record.read_text())["members"]]
        else:
            out.append(path)
    return out


def is_ensemble_folder(path) -> bool:
    """Whether one folder scores as an ensemble: E >= 2 heads recorded, or a seeds record (read, nothing loaded)."""
    from hhrm.model_checks import reward_heads

    return bool(path) and (reward_heads(path) > 1 or (Path(str(path)).expanduser() / RECORD).is_file())


def size_of(args, folder=None) -> int:
    """How many member rewards ``args`` score per text (heads counted): 0 for one one-head model or a server."""
    from hhrm.model_checks import reward_heads

    # The server's config names its one folder model_name_or_path.
    folder = getattr(args, "reward_model_name_or_path", None) or getattr(args, "model_name_or_path", None) or folder
    if getattr(args, "reward_model_url", None) or not (args.reward_ensemble or is_ensemble_folder(folder)):
        return 0
    return sum(reward_heads(p) for p in expand(args.reward_ensemble or [folder]))


def check_settings(args) -> None:
    """Refuse, in one line naming the setting, an ensemble that cannot be built (before anything loads)."""
    members, rule, lam = args.reward_ensemble, args.reward_aggregation, args.reward_uwo_lambda
    folders = expand(members or [])
    checks = [
        (rule in AGGREGATIONS, f"reward_aggregation={rule!r}: one of {', '.join(AGGREGATIONS)}"),
        (members is None or bool(members), "reward_ensemble is empty: give E >= 1 reward-model folders"),
        (lam >= 0, f"reward_uwo_lambda={lam}: must be >= 0 (0 is the mean; larger penalises disagreement more)"),
        (rule == "mean" or size_of(args) >= 2,  # heads count: config.json is read, no weight loaded
         f"reward_aggregation={rule} with {'one reward model' if members else 'no reward_ensemble'}: {rule} needs "
         "reward_ensemble with E >= 2 folders or a multi-head RM (one model has no disagreement); use mean, or add "
         "members"),
        (len(set(folders)) == len(folders),
         "reward_ensemble names a folder twice: each member must be its own reward model"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def aggregate(members: np.ndarray, rule: str, uwo_lambda: float = 0.5) -> np.ndarray:
    """``members``: ``[E, N]`` rewards; one reward per text (column) by ``rule``."""
    members = np.asarray(members, dtype=np.float64)
    if rule == "mean":
        return members.mean(axis=0)
    if rule == "worst":
        return members.min(axis=0)
    if rule == "uwo":
        return members.mean(axis=0) - uwo_lambda * members.var(axis=0)
    raise ValueError(f"reward_aggregation={rule!r}: one of {', '.join(AGGREGATIONS)}")


def address(args: Any) -> str:
    """How the reports name an ensemble: its rule and its folders (or its one multi-head folder)."""
    get = args.get if isinstance(args, dict) else lambda k: getattr(args, k, None)
    rule = get("reward_aggregation") or "mean"
    if rule == "uwo":
        rule += f", lambda {get('reward_uwo_lambda')}"
    folders = get("reward_ensemble") or [get("reward_model_name_or_path")]
    return f"ensemble ({rule}) of " + ", ".join(str(Path(m)) for m in folders)


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """What decides the token ids a member reads: its vocabulary and its special tokens."""
    return {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special tokens": sorted(map(str, tokenizer.all_special_tokens)),
        "special token ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
    }


def check_members(members: list, setting: str = "reward_ensemble") -> None:
    """Refuse members that would score different token ids or read another position than the first member."""
    first = members[0]
    first_tokens = tokenizer_fingerprint(first.tokenizer)
    for i, member in enumerate(members[1:], start=2):
        if member.convention != first.convention:
            raise ValueError(
                f"{setting}: member {i} ({member.describe()}) is scored by reward_convention "
                f"{member.convention.name}, member 1 ({first.describe()}) by {first.convention.name}: an ensemble's "
                "members must read the same position of the same text (train them by one recipe)"
            )
        theirs = tokenizer_fingerprint(member.tokenizer)
        differ = [k for k in first_tokens if first_tokens[k] != theirs[k]]
        if differ:
            raise ValueError(
                f"{setting}: member {i} ({member.describe()}) has another tokenizer than member 1 "
                f"({first.describe()}): its {' and '.join(differ)} differ; an ensemble's members must share one "
                "tokenizer (train them from the same SFT start)"
            )


def heads_of(member) -> int:
    return getattr(member, "heads", 1)


def has_members(source) -> bool:
    """Whether ``source`` answers member rewards (``score_members``): an :class:`Ensemble` (folders or heads), or
    hhrm's client of a server that serves one (:class:`hhrm.reward.client.HhrmServer`). The one test callers use."""
    return bool(getattr(source, "with_members", False))


class Ensemble:
    """Reward-model sources scored on the same pairs, E rewards per text in all (a member with H heads gives H);
    ``score_pairs`` is the rule's aggregate."""

    with_members = True  # has_members

    def __init__(self, members: list, rule: str = "mean", uwo_lambda: float = 0.5):
        if not members:
            raise ValueError("reward_ensemble is empty: give E >= 1 reward-model folders")
        check_members(members)
        self.members, self.rule, self.uwo_lambda = list(members), rule, float(uwo_lambda)
        self.size = sum(heads_of(m) for m in self.members)  # E: the rows of table_ids

    @property
    def tokenizer(self):
        return self.members[0].tokenizer  # all members' are equal (checked)

    @property
    def convention(self):
        return self.members[0].convention

    def score_members(self, prompts: list[str], responses: list[str]) -> dict[str, list]:
        """Per text: ``reward`` (by the rule), ``mean``, ``std`` and ``members`` (E rewards, in member order)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rows = []
        for m in self.members:
            if heads_of(m) == 1:  # any source: its own score_pairs
                rows.append(np.asarray(m.score_pairs(prompts, responses), dtype=np.float64).reshape(1, -1))
            else:  # all heads from one forward, by the member's convention
                got = m.scorer.score_pairs_heads(prompts, responses)
                rows.append(np.asarray(got, dtype=np.float64).reshape(len(prompts), heads_of(m)).T)
        return self.summary(np.concatenate(rows).reshape(self.size, len(prompts)))

    @staticmethod
    def _heads(member, ids, types) -> np.ndarray:
        """``[H, N]``: a member's heads' rewards of encoded texts."""
        got = member.scorer.score_ids_heads(ids, types)
        return np.asarray(got, dtype=np.float64).reshape(len(ids), heads_of(member)).T

    def table_ids(self, ids: list[list[int]], token_type_ids: list[list[int]] | None = None) -> np.ndarray:
        """``[E, N]`` member rewards of texts already encoded by the (shared) convention: the server's path."""
        rows = [self._heads(m, ids, token_type_ids) for m in self.members]
        return np.concatenate(rows).reshape(self.size, len(ids))

    def summary(self, table: np.ndarray) -> dict[str, list]:
        """``[E, N]`` member rewards -> per text ``reward`` (by the rule), ``mean``, ``std`` and ``members``."""
        return {
            "reward": aggregate(table, self.rule, self.uwo_lambda).tolist(),
            "mean": table.mean(axis=0).tolist(),
            "std": table.std(axis=0).tolist(),
            "members": table.T.tolist(),
        }

    def score_pairs(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.score_members(prompts, responses)["reward"]

    def identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ensemble": [m.identity() for m in self.members], "aggregation": self.rule}
        if self.rule == "uwo":
            out["uwo_lambda"] = self.uwo_lambda
        return out | {"convention": self.convention.name}

    def describe(self) -> str:
        rule = self.rule + (f", lambda {self.uwo_lambda}" if self.rule == "uwo" else "")
        named = [m.describe() + (f" ({heads_of(m)} heads)" if heads_of(m) > 1 else "") for m in self.members]
        return f"ensemble ({rule}) of " + ", ".join(named)

    @contextlib.contextmanager
    def gathered(self):
        with contextlib.ExitStack() as stack:
            for member in self.members:
                stack.enter_context(member.gathered())
            yield

    def release(self) -> None:
        for member in self.members:
            member.release()

    @property
    def resident(self) -> bool:
        return all(m.resident for m in self.members)


def per_text(source, prompts: list[str], responses: list[str]) -> list[tuple[float, dict[str, Any]]]:
    """Per text, its reward and, from a source with members, its mean, std and members (``make score``'s columns)."""
    if not has_members(source):
        return [(r, {}) for r in source.score_pairs(prompts, responses)]
    got = source.score_members(prompts, responses)
    return [(r, dict(zip(COLUMNS, rest))) for r, *rest in zip(got["reward"], *(got[k] for k in COLUMNS))]


def build(
    args, member, device=None, dtype=None, max_tokens_per_batch: int = 32_768, setting="reward_model_name_or_path"
) -> Ensemble:
    """The ensemble ``args.reward_ensemble`` (else the one multi-head or seeds folder ``setting`` names) stands for,
    each folder a ``member`` (:class:`hhrm.reward.sources.LocalModel`, passed in: sources imports this module)
    checked (files, convention) and none loaded yet."""
    named = [(f"reward_ensemble[{i}]", p) for i, p in enumerate(args.reward_ensemble or [])]
    named = named or [(setting, args.reward_model_name_or_path)]
    members = [
        member(path, args.reward_convention, device, dtype, args.reward_batch_size, max_tokens_per_batch, name)
        for name, folder in named
        for path in expand([folder])
    ]
    return Ensemble(members, args.reward_aggregation, args.reward_uwo_lambda)
