"""RAFT stage: reward-ranked fine-tuning, a resumable best-of-K loop on TRL.

TRL 1.16 ships no best-of-N sampler and no iterative SFT trainer, so the loop is written here from
TRL's pieces: generation through :mod:`hhrm.generation` (``unwrap_model_for_generation`` for
DDP/ZeRO-3, optional vLLM), rewards through :class:`hhrm.reward.scoring.RewardScorer`, and the fine-tune
through ``SFTTrainer`` on ``{"prompt", "completion"}`` rows (loss on the completion only).

Each iteration ``i`` lives in ``output_dir/iter_<i>/`` and runs six stages. A stage's main output is
written last and atomically (temp file + rename), so its presence means "stage done"; a re-run of the
same command skips finished stages and redoes an interrupted one from its inputs, with seeds that
depend only on (seed, iteration, rank). That is why an interrupted run ends where an uninterrupted
one would.

=========  ==========================================  =====================
stage      writes                                      needs
=========  ==========================================  =====================
draw       prompts.jsonl                               prompt set, seed
generate   heldout_samples.jsonl, samples.jsonl        policy i
score      heldout_scored.jsonl, scored.jsonl          reward model
select     filtered.jsonl, kept.jsonl                  (nothing loaded)
train      policy/ (policy i+1), train.stats.json      policy i
metrics    metrics.json (+ run-level table, PNG)       (nothing loaded)
=========  ==========================================  =====================

After the last iteration ``final/`` evaluates the final policy on the held-out prompts, and
``output_dir`` receives the final policy, ``metrics.json``, the per-iteration table and curve, and a
model card.

The package, one concern a module: ``config`` (RaftConfig, the stages), ``prompts`` (the prompt set and
each iteration's draw), ``files`` (markers, sharding and gathering rows, the final policy's files),
``models`` (which model is resident), ``select`` (junk filters and the kept-set rules), ``report``
(metrics, table, curve, model card: no model needed) and ``loop`` (RaftRunner, the algorithm).
"""

from hhrm.raft.config import STAGES, RaftConfig, StopRequested
from hhrm.raft.loop import RaftRunner

__all__ = ["STAGES", "RaftConfig", "RaftRunner", "StopRequested"]
