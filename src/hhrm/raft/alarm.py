"""RAFT's over-optimisation alarm: the reward ensemble's disagreement and the proxy-vs-held-out gap, per iteration.

With a reward source that scores its members (``score_members``: :class:`hhrm.reward.ensemble.Ensemble`, or any
source with that method), the score stage keeps beside each reward the members' std and mean (``reward_std``,
``reward_mean`` in ``scored.jsonl``; ``sampled_reward_std`` ... in ``heldout_scored.jsonl``). Per iteration:

- ``disagreement_kept``: mean member std over the kept samples (update=dpo: the chosen ones), the texts the update
  trains towards; ``disagreement_all``: over all K*N samples, for contrast; ``disagreement_heldout``: over the
  policy's sampled held-out answers. Where members disagree the proxy is extrapolating (Coste et al. 2023), and
  best-of-K picks concentrate there first.
- ``proxy_gap``: ``reward_kept - heldout_reward``: the proxy reward of the kept set minus that of the policy's own
  sampled answers to the held-out prompts (one reward source, one rule). Fine-tuning on the kept set should pull the
  policy's reward up towards it; when the picks' reward is more and more the proxy's error (the winner's curse of
  best-of-K), the picks run away from what the policy reproduces on unseen prompts and the gap widens. It needs no
  ensemble. ``proxy_gap_rise``: its change since iteration 0, in reward units.

Measured on gold (results/ensemble/alarm.md, scripts/alarm_gold.py): with the weak RM's 5-seed ensemble neither
signal warned before gold fell; the members' std fell as the policy over-optimised, and the gap widened under
update=dpo but narrowed under update=sft while gold fell in both. The alarm is a record and a guard, not a proof.

The alarm fires at iteration ``i >= 1`` when ``disagreement_kept`` has risen by more than
``overopt_alarm_disagreement`` (a fraction) over iteration 0's, or ``proxy_gap_rise`` exceeds ``overopt_alarm_gap``.
It is checked once the select stage is done (before the fine-tune) from the run folder alone, so a rerun decides the
same. With ``stop_on_alarm`` the run stops there without the alarmed update: its final policy is policy ``i`` (the
one iteration ``i`` sampled from, the last one not trained on an alarmed kept set).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from hhrm.reporting import read_json, read_jsonl
from hhrm.reward import ensemble

logger = logging.getLogger(__name__)
ROW_FIELDS = ("disagreement_kept", "disagreement_all", "disagreement_heldout", "proxy_gap", "proxy_gap_rise")


def is_ensemble(source: Any) -> bool:
    """A source that scores its members (:func:`hhrm.reward.ensemble.has_members`)."""
    return ensemble.has_members(source)


def check_settings(args: Any) -> None:
    """Refuse, in one line naming the setting, alarm settings that cannot work (when the config is parsed)."""
    dis, gap = args.overopt_alarm_disagreement, args.overopt_alarm_gap
    members = ensemble.size_of(args) if args.reward_ensemble else None  # heads counted, config.json only
    checks = [
        (dis is None or dis >= 0, f"overopt_alarm_disagreement={dis}: must be >= 0 (a fraction: 0.5 fires when the "
         "kept samples' ensemble std rises by more than 50% over iteration 0's)"),
        (gap is None or gap >= 0, f"overopt_alarm_gap={gap}: must be >= 0 (reward units of proxy_gap's rise)"),
        (dis is None or members is None or members >= 2, "overopt_alarm_disagreement with reward_ensemble of one "
         "folder (one reward head): one model has no disagreement; give E >= 2 folders or drop the setting"),
        (not args.stop_on_alarm or dis is not None or gap is not None, "stop_on_alarm=true with no alarm: set "
         "overopt_alarm_disagreement and/or overopt_alarm_gap"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def check_source(args: Any, source: Any) -> None:
    """The disagreement alarm needs a source that scores its members (checked once the source is built)."""
    if args.overopt_alarm_disagreement is not None and not (is_ensemble(source) and getattr(source, "size", 2) > 1):
        raise ValueError(
            f"overopt_alarm_disagreement={args.overopt_alarm_disagreement}: the reward source has no members to "
            "disagree (a single reward model); use reward_ensemble with E >= 2 folders, or overopt_alarm_gap"
        )


# ----- the score stage's columns -------------------------------------------------------------


def spread(got: dict[str, list[float]], start: int, stop: int, prefix: str = "") -> dict[str, list[float]]:
    """``reward_std`` / ``reward_mean`` of texts ``start:stop`` (nothing from a single reward model)."""
    return {f"{prefix}reward_{k}": got[k][start:stop] for k in ("std", "mean") if k in got}


def heldout_spread(got: dict[str, list[float]], j: int, m: int) -> dict[str, float]:
    """Held-out answer ``j`` of ``m`` (sampled ones first, then greedy): its members' std and mean."""
    return {f"{kind}_reward_{k}": got[k][j + off] for kind, off in (("sampled", 0), ("greedy", m)) for k in
            ("std", "mean") if k in got}  # fmt: skip


# ----- per-iteration metrics -----------------------------------------------------------------


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else float("nan")


def heldout_disagreement(held: list[dict[str, Any]]) -> dict[str, float]:
    """Mean member std of the policy's sampled held-out answers (nothing without an ensemble)."""
    if not held or "sampled_reward_std" not in held[0]:
        return {}
    return {"disagreement_heldout": _mean([r["sampled_reward_std"] for r in held])}


def signals(folder: Path) -> dict[str, float]:
    """One iteration's disagreement and proxy gap, from its folder once the select stage is done."""
    scored = read_jsonl(folder / "scored.jsonl")
    kept = read_jsonl(folder / "kept.jsonl")
    held = read_jsonl(folder / "heldout_scored.jsonl") if (folder / "heldout_scored.jsonl").is_file() else []
    out: dict[str, float] = {}
    if held and kept:
        out["proxy_gap"] = _mean([r["reward"] for r in kept]) - _mean([r["sampled_reward"] for r in held])
    if scored and "reward_std" in scored[0]:
        std = {(r["index"], j): s for r in scored for j, s in enumerate(r["reward_std"])}
        picks = [(r["index"], r["sample"] if "sample" in r else r["chosen_sample"]) for r in kept]
        out["disagreement_kept"] = _mean([std[p] for p in picks])
        out["disagreement_all"] = _mean(list(std.values()))
    return out


def rise(now: float | None, first: float | None) -> float | None:
    """Relative rise of ``now`` over ``first`` (inf from a zero start; None when either is missing)."""
    if now is None or first is None or math.isnan(now) or math.isnan(first):
        return None
    if first <= 0:
        return math.inf if now > first else 0.0
    return now / first - 1.0


def evaluate(folder: Path, first_folder: Path, iteration: int, args: Any, log: bool = False) -> dict[str, Any]:
    """Iteration ``iteration``'s signals and alarm (against iteration 0's), for its ``metrics.json``; ``log``: warn
    when it fires.

    ``alarm``: which signals fired (None: none); ``alarm_reason``: their numbers; ``alarm_stop``: it fired and
    ``stop_on_alarm`` stops the run here."""
    now = signals(folder)
    first = now if iteration == 0 else signals(first_folder)
    out: dict[str, Any] = dict(now)
    if "proxy_gap" in now and "proxy_gap" in first:
        out["proxy_gap_rise"] = now["proxy_gap"] - first["proxy_gap"]
    out["disagreement_kept_rise"] = rise(now.get("disagreement_kept"), first.get("disagreement_kept"))
    reasons, fired = [], []
    dis, gap = args.overopt_alarm_disagreement, args.overopt_alarm_gap
    if iteration >= 1 and dis is not None and (out["disagreement_kept_rise"] or 0.0) > dis:
        fired.append("disagreement")
        reasons.append(
            f"kept-sample disagreement {now['disagreement_kept']:.4g} rose {out['disagreement_kept_rise']:.1%} over "
            f"iteration 0's {first['disagreement_kept']:.4g} (overopt_alarm_disagreement={dis})"
        )
    if iteration >= 1 and gap is not None and out.get("proxy_gap_rise", -math.inf) > gap:
        fired.append("gap")
        reasons.append(
            f"proxy gap {now['proxy_gap']:.4g} rose {out['proxy_gap_rise']:.4g} over iteration 0's "
            f"{first['proxy_gap']:.4g} (overopt_alarm_gap={gap})"
        )
    out["alarm"] = "+".join(fired) or None  # the table's column; alarm_reason: the numbers
    out["alarm_reason"] = "; ".join(reasons) or None
    out["alarm_stop"] = bool(reasons) and bool(args.stop_on_alarm)
    if log and reasons:
        stop = f" (stop_on_alarm: the run stops here, before its update; final policy: policy {iteration})"
        logger.warning("over-optimisation alarm at iteration %d: %s%s", iteration, reasons, stop * out["alarm_stop"])
    return out


def stopped_at(metrics_file: Path) -> bool:
    """Whether a finished iteration's ``metrics.json`` records that the alarm stopped the run there."""
    return bool(read_json(metrics_file).get("alarm_stop"))


def headline(rows: list[dict[str, Any]], final_iteration: int) -> dict[str, Any]:
    """The run's alarm summary: first iteration it fired at, whether it stopped the run, the final policy's index."""
    fired = [r["iteration"] for r in rows if r.get("alarm")]
    return {
        "alarm_first_iteration": fired[0] if fired else None,
        "stopped_by_alarm": any(r.get("alarm_stop") for r in rows),
        "final_policy_iteration": final_iteration,
    }


def card_note(headline: dict[str, Any]) -> str:
    """The model card's sentence on the alarm (empty when it never fired)."""
    at = headline.get("alarm_first_iteration")
    if at is None:
        return ""
    if headline.get("stopped_by_alarm"):
        return (
            f"\n\nThe over-optimisation alarm (hhrm.raft.alarm) fired at iteration {at} and stopped the run before "
            f"that iteration's update: this is policy {headline.get('final_policy_iteration')}, the one iteration "
            f"{at} sampled from."
        )
    return f"\n\nThe over-optimisation alarm (hhrm.raft.alarm) fired at iteration {at} (stop_on_alarm off)."


def plot_signals(ax, rows: list[dict[str, Any]]) -> None:
    """The reward curve's alarm panel: disagreement (kept, all, held-out) and the proxy gap, alarms marked."""
    its = [r["iteration"] for r in rows]
    for key, style in (("disagreement_kept", "o-"), ("disagreement_all", "s--"), ("disagreement_heldout", "^:")):
        ax.plot(its, [r.get(key) for r in rows], style, label=key)
    ax.set_xlabel("RAFT iteration")
    ax.set_ylabel("ensemble std (members)")
    gap = ax.twinx()
    gap.plot(its, [r.get("proxy_gap") for r in rows], "d-", color="grey", label="proxy_gap (right)")
    gap.set_ylabel("proxy_gap: kept reward - held-out reward")
    for r in rows:
        if r.get("alarm"):
            ax.axvline(r["iteration"], color="red", alpha=0.4, linestyle="--")
    ax.set_title("over-optimisation signals (red: alarm)", fontsize=9)
    lines = ax.get_legend_handles_labels()
    more = gap.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7)
