"""RAFT stage: reward-ranked fine-tuning, a resumable best-of-K loop on TRL.

TRL 1.16 ships no best-of-N sampler and no iterative SFT trainer, so the loop is written here from
TRL's pieces: generation through :mod:`hhrm.generation` (``unwrap_model_for_generation`` for
DDP/ZeRO-3, optional vLLM), rewards through :class:`hhrm.scoring.RewardScorer`, and the fine-tune
through ``SFTTrainer`` on ``{"prompt", "completion"}`` rows (loss on the completion only).

Each iteration ``i`` lives in ``output_dir/iter_<i>/`` and runs five stages. A stage's main output is
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
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import trl
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset

from hhrm import data as hdata
from hhrm import generation, modelcard, modeling, raft_select, sft, synthetic
from hhrm.runtime import DevicePrecisionMixin
from hhrm.scoring import RewardScorer

logger = logging.getLogger(__name__)

STAGES = ("draw", "generate", "score", "select", "train", "metrics")
BACKENDS = ("hf", "vllm")
# auto offload: a policy checkpoint above this size (≈1B fp32 / 2B bf16 params) is "big".
OFFLOAD_AUTO_BYTES = 4 * 1024**3


class StopRequested(Exception):
    """Raised after the stage named by ``stop_after`` (tests and staged runs stop there on purpose)."""


@dataclass
class RaftConfig(DevicePrecisionMixin, trl.SFTConfig):
    """RAFT settings beside TRL's SFTConfig, which holds the per-iteration fine-tune settings.

    ``output_dir`` is the run folder; the fine-tune of iteration ``i`` uses every SFT setting here
    with ``seed + i``. Defaults follow the card (2,048 prompts per iteration, K=8, best of K).
    """

    bf16: bool | None = field(default=None, metadata={"help": "None: bf16 on a bf16-capable GPU, fp32 elsewhere."})
    max_length: int | None = field(default=1024, metadata={"help": "Fine-tune: truncate prompt+completion tokens."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Fine-tune epochs over each iteration's kept set."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Fine-tune learning rate (each iteration)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Fine-tune schedule (each iteration)."})
    save_strategy: str = field(default="no", metadata={"help": "Trainer checkpoints inside an iteration (off)."})

    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reward model folder (output of recipes/rm.py)."}
    )
    num_iterations: int = field(default=10, metadata={"help": "RAFT iterations."})
    prompts_per_iteration: int = field(default=2048, metadata={"help": "Prompts drawn per iteration (card: 2,048)."})
    num_samples: int = field(default=8, metadata={"help": "K: responses generated per prompt (card: 8)."})
    selection: str = field(default="best_of_k", metadata={"help": "best_of_k | top_fraction."})
    top_fraction: float = field(
        default=0.125, metadata={"help": "top_fraction: share of all K*N samples kept (1/K keeps N)."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Sampling: max new tokens per response."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Sampling nucleus threshold (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Sampling top-k (0: off)."})
    max_prompt_tokens: int = field(
        default=512, metadata={"help": "Prompts longer than this (policy tokens) are left out of the prompt set."}
    )
    generation_batch_size: int = field(default=16, metadata={"help": "Prompts per generate call (x K sequences)."})
    reward_batch_size: int = field(default=32, metadata={"help": "Texts per reward-model forward."})
    filter_min_tokens: int = field(default=2, metadata={"help": "Junk filter: responses shorter are dropped."})
    filter_max_repeat_fraction: float = field(
        default=0.5, metadata={"help": "Junk filter: max share of repeated word 3-grams (1.0: off)."}
    )
    filter_patterns: list[str] = field(
        default_factory=list, metadata={"help": "Junk filter: regular expressions; a matching response is dropped."}
    )
    heldout_prompts: int = field(default=200, metadata={"help": "Fixed held-out prompts (RM test) evaluated each iteration."})
    offload_models: str = field(
        default="auto",
        metadata={"help": "Keep one large model resident at a time: auto (on above ~1B params) | true | false."},
    )
    generation_backend: str = field(default="hf", metadata={"help": "hf (transformers generate) | vllm."})
    vllm_mode: str = field(default="colocate", metadata={"help": "vllm: colocate | server."})
    vllm_gpu_memory_utilization: float = field(default=0.4, metadata={"help": "vllm colocate: GPU memory share."})
    progress: bool = field(default=True, metadata={"help": "Progress bars for generation and scoring."})
    stop_after: str | None = field(
        default=None, metadata={"help": "'<iteration>:<stage>': stop after that stage (staged runs, tests)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        checks: list[tuple[bool, str]] = [
            (self.num_iterations >= 1, f"num_iterations={self.num_iterations}: must be >= 1"),
            (self.prompts_per_iteration >= 1, f"prompts_per_iteration={self.prompts_per_iteration}: must be >= 1"),
            (self.num_samples >= 1, f"num_samples={self.num_samples}: must be >= 1"),
            (self.selection in raft_select.SELECTIONS,
             f"selection={self.selection!r}: expected one of {raft_select.SELECTIONS}"),
            (0.0 < self.top_fraction <= 1.0, f"top_fraction={self.top_fraction}: must be in (0, 1]"),
            (self.max_prompt_tokens >= 1, f"max_prompt_tokens={self.max_prompt_tokens}: must be >= 1"),
            (self.generation_batch_size >= 1, f"generation_batch_size={self.generation_batch_size}: must be >= 1"),
            (self.reward_batch_size >= 1, f"reward_batch_size={self.reward_batch_size}: must be >= 1"),
            (self.heldout_prompts >= 0, f"heldout_prompts={self.heldout_prompts}: must be >= 0"),
            (str(self.offload_models).lower() in ("auto", "true", "false"),
             f"offload_models={self.offload_models!r}: expected auto | true | false"),
            (self.generation_backend in BACKENDS, f"generation_backend={self.generation_backend!r}: expected one of {BACKENDS}"),
            (self.vllm_mode in ("colocate", "server"), f"vllm_mode={self.vllm_mode!r}: expected colocate | server"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.sampling_arguments()  # validates temperature / max_new_tokens now, not after the first model load
        self.junk_filter()
        if self.stop_after is not None:
            self.parse_stop_after()

    def sampling_arguments(self) -> generation.SamplingArguments:
        sampling = generation.SamplingArguments(
            max_new_tokens=self.max_new_tokens, do_sample=True, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k,
        )
        if sampling.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be > 0")
        if sampling.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0")
        if not 0.0 < sampling.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if sampling.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0")
        return sampling

    def greedy_arguments(self) -> generation.SamplingArguments:
        return generation.SamplingArguments(max_new_tokens=self.max_new_tokens, do_sample=False)

    def junk_filter(self) -> raft_select.JunkFilter:
        return raft_select.JunkFilter(
            min_tokens=self.filter_min_tokens, max_repeat_fraction=self.filter_max_repeat_fraction,
            patterns=list(self.filter_patterns or []),
        )

    def parse_stop_after(self) -> tuple[int, str]:
        try:
            it, stage = str(self.stop_after).split(":")
            it_n = int(it)
        except ValueError:
            raise ValueError(f"stop_after={self.stop_after!r}: expected '<iteration>:<stage>', e.g. '1:score'") from None
        if stage not in STAGES:
            raise ValueError(f"stop_after={self.stop_after!r}: stage must be one of {STAGES}")
        return it_n, stage


# --------------------------------------------------------------------------------------------
# Small file helpers: every stage output is written whole, then renamed into place.


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    hdata.write_json(obj, tmp)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else {}


def is_done(path: Path) -> bool:
    """A stage output exists (policy folders count once their rename marker is there)."""
    return (path / "raft_done").is_file() if path.suffix == "" and not path.name.endswith("jsonl") else path.is_file()


# --------------------------------------------------------------------------------------------
# Prompt set and draws


def prompt_set(splits: hdata.PreferenceSplits, tokenizer, max_prompt_tokens: int) -> tuple[list[str], dict[str, int]]:
    """Distinct RM-train prompts (first occurrence order) that fit ``max_prompt_tokens``."""
    distinct = list(dict.fromkeys(splits.train["prompt"]))
    lengths = [len(x) for x in tokenizer(distinct, add_special_tokens=False)["input_ids"]]
    kept = [p for p, n in zip(distinct, lengths) if n <= max_prompt_tokens]
    report = {"prompt_rows": len(splits.train), "distinct": len(distinct), "too_long": len(distinct) - len(kept),
              "prompt_set": len(kept)}
    if not kept:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens}: no prompt of the training data is that short")
    return kept, report


def draw_prompts(num_prompts: int, k: int, seed: int, iteration: int) -> list[int]:
    """``k`` distinct prompt indices for ``iteration``; a pure function of (seed, iteration)."""
    if k > num_prompts:
        raise ValueError(f"prompts_per_iteration={k} is larger than the prompt set ({num_prompts} prompts)")
    rng = np.random.default_rng([seed, iteration])
    return sorted(int(i) for i in rng.choice(num_prompts, size=k, replace=False))


def shard(items: list[Any], rank: int, world: int) -> list[Any]:
    """Rank ``rank``'s share: every ``world``-th item, so shards differ in size by at most one."""
    return items[rank::world]


def gather_rows(rows: list[dict[str, Any]], key: str, expected: list[Any]) -> list[dict[str, Any]]:
    """All ranks' rows, in ``expected`` order; fails if a key is missing or handled twice."""
    everyone = gather_object(rows)
    by_key: dict[Any, dict[str, Any]] = {}
    for row in everyone:
        if row[key] in by_key:
            raise RuntimeError(f"{key}={row[key]!r} was handled by two processes")
        by_key[row[key]] = row
    missing = [k for k in expected if k not in by_key]
    if missing or len(by_key) != len(expected):
        raise RuntimeError(f"{len(missing)} {key}s were lost across processes (e.g. {missing[:3]})")
    return [by_key[k] for k in expected]


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class _Policy:
    path: str
    model: Any
    accelerator: Any = None  # set when ``model`` is a trainer's wrapped model (DDP / ZeRO-3 engine)
    trainer: Any = None


class RaftRunner:
    """One RAFT run; :meth:`run` executes (or resumes) every stage and returns the headline metrics."""

    def __init__(self, args: RaftConfig, data_args: hdata.DataArguments, model_args: trl.ModelConfig):
        if not args.reward_model_name_or_path:
            raise ValueError("reward_model_name_or_path is not set: give the reward model folder (recipes/rm.py output)")
        self.args, self.data_args, self.model_args = args, data_args, model_args
        self.state = PartialState()
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.out = Path(args.output_dir)
        self.tokenizer = modeling.load_tokenizer(model_args, padding_side="right")
        self.splits = hdata.load_splits(data_args)
        self.prompts, self.prompt_report = prompt_set(self.splits, self.tokenizer, args.max_prompt_tokens)
        draw_prompts(len(self.prompts), args.prompts_per_iteration, args.seed, 0)  # fail now on a too-large draw
        self.heldout = sft.heldout_prompts(self.splits, args.heldout_prompts)
        self.gold = sft.is_gold_checkable(self.heldout)
        self.sampling = args.sampling_arguments()
        self.filter = args.junk_filter()
        self.stop_after = args.parse_stop_after() if args.stop_after else None
        self.offload = self._resolve_offload()
        self._policy: _Policy | None = None
        self._scorer: RewardScorer | None = None
        self._vllm = None

    # ----- model residency ---------------------------------------------------------------

    def _resolve_offload(self) -> bool:
        value = str(self.args.offload_models).lower()
        if value != "auto":
            return value == "true"
        path = Path(self.model_args.model_name_or_path)
        if not path.is_dir():
            return True  # a hub id: the card's models are billions of parameters
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) + sum(f.stat().st_size for f in path.glob("*.bin"))
        return size > OFFLOAD_AUTO_BYTES

    def _free(self, what: str) -> None:
        if what == "policy" and self._policy is not None:
            self._policy = None
        if what == "scorer" and self._scorer is not None:
            self._scorer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def policy_path(self, iteration: int) -> str:
        return self.model_args.model_name_or_path if iteration == 0 else str(self.iter_dir(iteration - 1) / "policy")

    def policy(self, iteration: int) -> _Policy:
        path = self.policy_path(iteration)
        if self._policy is not None and self._policy.path == path:
            return self._policy
        if self.offload:
            self._free("scorer")
        self._free("policy")
        from transformers import AutoModelForCausalLM

        kwargs = modeling.model_init_kwargs(replace(self.model_args, model_name_or_path=path), self.args)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        modeling.match_vocab(model, self.tokenizer)
        if not getattr(model, "hf_device_map", None):
            model.to(self.state.device)
        self._policy = _Policy(path=path, model=model)
        return self._policy

    def scorer(self) -> RewardScorer:
        if self._scorer is None:
            if self.offload:
                self._free("policy")
            self._scorer = RewardScorer.from_pretrained(
                self.args.reward_model_name_or_path, device=str(self.state.device),
                dtype=torch.bfloat16 if self.args.bf16 else torch.float32, batch_size=self.args.reward_batch_size,
            )
        return self._scorer

    def generate(self, iteration: int, prompts: list[str], k: int, sampling, seed: int,
                 stats: dict[str, Any]) -> list[list[str]]:
        policy = self.policy(iteration)
        if self.args.generation_backend == "vllm":
            if self._vllm is None:
                self._vllm = generation.VLLMBackend(
                    policy.model, self.tokenizer, self._accelerator(), self.sampling, mode=self.args.vllm_mode,
                    gpu_memory_utilization=self.args.vllm_gpu_memory_utilization,
                )
            if sampling == self.sampling:
                self._vllm.engine.model = policy.model
                self._vllm.sync_weights()
                return generation.generate_responses(self._vllm, self.tokenizer, prompts, k, sampling, stats=stats,
                                                     progress=self.args.progress and self.state.is_main_process)
        return generation.generate_responses(
            policy.model, self.tokenizer, prompts, k, sampling, self.args.generation_batch_size,
            progress=self.args.progress and self.state.is_main_process, accelerator=policy.accelerator, seed=seed,
            stats=stats,
        )

    def _accelerator(self):
        from accelerate import Accelerator

        return Accelerator()

    def score(self, texts_prompts: list[str], texts_responses: list[str], desc: str) -> list[float]:
        """Rewards of ``prompt + response`` pairs, in chunks so a progress bar can move."""
        scorer = self.scorer()
        chunk = max(self.args.reward_batch_size * 8, 1)
        starts = range(0, len(texts_prompts), chunk)
        if self.args.progress and self.state.is_main_process:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc, unit="chunk")
        out: list[float] = []
        # One gather for all chunks: ranks' shards differ in size, so their chunk counts may too.
        with modeling.full_parameters(scorer.model):
            for s in starts:
                out += scorer.score_pairs(texts_prompts[s : s + chunk], texts_responses[s : s + chunk])
        return out

    # ----- stage plumbing ----------------------------------------------------------------

    def iter_dir(self, iteration: int) -> Path:
        return self.out / f"iter_{iteration:03d}"

    def seed_for(self, iteration: int, stage: int) -> int:
        """Sampling seed: depends on (seed, iteration, stage, rank) only, never on what ran before."""
        return (self.args.seed * 1_000_003 + iteration * 101 + stage) * 257 + self.rank

    def done(self, marker: Path) -> bool:
        """Whether a stage output exists, as rank 0 sees it, on every rank.

        Each rank checking the file itself is a race: rank 0 may write the marker of a stage (metrics)
        before a slower rank has checked it, and that rank would then skip the stage's barriers."""
        answer = [is_done(marker)]
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(answer, from_process=0)
        return answer[0]

    def _stage(self, iteration: int, name: str, marker: Path, work: Callable[[], dict[str, Any] | None]) -> None:
        """Run ``work`` unless ``marker`` exists; record its wall time; honour ``stop_after``."""
        if not self.done(marker):
            start = time.perf_counter()
            stats = work() or {}
            stats["seconds"] = time.perf_counter() - start
            if self.state.is_main_process:
                write_json(stats, self.iter_dir(iteration) / f"{name}.stats.json")
            self.state.wait_for_everyone()
        else:
            logger.info("iteration %d: %s already done, skipping", iteration, name)
        if self.stop_after == (iteration, name):
            raise StopRequested(f"stopped after {iteration}:{name} (stop_after)")

    def _write_main(self, rows: list[dict[str, Any]], path: Path) -> None:
        if self.state.is_main_process:
            write_jsonl(rows, path)
        self.state.wait_for_everyone()

    # ----- stages ------------------------------------------------------------------------

    def stage_draw(self, it: int) -> dict[str, Any]:
        idx = draw_prompts(len(self.prompts), self.args.prompts_per_iteration, self.args.seed, it)
        self._write_main([{"index": i, "prompt": self.prompts[i]} for i in idx], self.iter_dir(it) / "prompts.jsonl")
        return {"prompts": len(idx)}

    def stage_generate(self, it: int) -> dict[str, Any]:
        d = self.iter_dir(it)
        drawn = read_jsonl(d / "prompts.jsonl")
        mine = shard(drawn, self.rank, self.world)
        k = self.args.num_samples
        gen_stats: dict[str, Any] = {}
        responses = self.generate(it, [r["prompt"] for r in mine], k, self.sampling, self.seed_for(it, 1), gen_stats)
        rows = [
            {"index": r["index"], "rank": self.rank, "prompt": r["prompt"], "responses": resp,
             "response_tokens": self._token_counts(resp)}
            for r, resp in zip(mine, responses)
        ]
        held = self._heldout_rows(it)
        rows = gather_rows(rows, "index", [r["index"] for r in drawn])
        totals = gather_object([gen_stats.get("generated_tokens", 0)])
        if self.state.is_main_process:
            write_jsonl(held, d / "heldout_samples.jsonl")
        self._write_main(rows, d / "samples.jsonl")
        return {"generated_tokens": int(sum(totals)), "generate_seconds": gen_stats.get("seconds"),
                "heldout_prompts": len(held)}

    def _heldout_rows(self, it: int) -> list[dict[str, Any]]:
        """The policy's sampled and greedy answers to the fixed held-out prompts (sharded, gathered)."""
        positions = list(range(len(self.heldout)))
        mine = shard(positions, self.rank, self.world)
        prompts = [self.heldout[i] for i in mine]
        sampled = self.generate(it, prompts, 1, self.sampling, self.seed_for(it, 2), {})
        greedy = self.generate(it, prompts, 1, self.args.greedy_arguments(), self.seed_for(it, 3), {})
        rows = [{"position": i, "prompt": p, "sampled": s[0], "greedy": g[0]}
                for i, p, s, g in zip(mine, prompts, sampled, greedy)]
        return gather_rows(rows, "position", positions)

    def _token_counts(self, responses: list[str]) -> list[int]:
        if not responses:
            return []
        return [len(x) for x in self.tokenizer(responses, add_special_tokens=False)["input_ids"]]

    def stage_score(self, it: int) -> dict[str, Any]:
        d = self.iter_dir(it)
        samples = read_jsonl(d / "samples.jsonl")
        held = read_jsonl(d / "heldout_samples.jsonl")
        k = self.args.num_samples
        mine = shard(samples, self.rank, self.world)
        flat_p = [r["prompt"] for r in mine for _ in range(k)]
        flat_r = [x for r in mine for x in r["responses"]]
        rewards = self.score(flat_p, flat_r, f"score ({len(samples) * k} samples)") if flat_p else []
        rows = [r | {"rewards": rewards[n * k : (n + 1) * k]} for n, r in enumerate(mine)]
        held_mine = shard(held, self.rank, self.world)
        h_rewards = self.score([r["prompt"] for r in held_mine] * 2,
                               [r["sampled"] for r in held_mine] + [r["greedy"] for r in held_mine], "score held-out")
        n = len(held_mine)
        held_rows = [r | {"sampled_reward": h_rewards[j], "greedy_reward": h_rewards[n + j]}
                     for j, r in enumerate(held_mine)]
        held_rows = gather_rows(held_rows, "position", [r["position"] for r in held])
        rows = gather_rows(rows, "index", [r["index"] for r in samples])
        if self.state.is_main_process:
            write_jsonl(held_rows, d / "heldout_scored.jsonl")
        self._write_main(rows, d / "scored.jsonl")
        return {"scored_texts": len(samples) * k + 2 * len(held)}

    def stage_select(self, it: int) -> dict[str, Any]:
        d = self.iter_dir(it)
        scored = read_jsonl(d / "scored.jsonl")
        reasons = [[self.filter.reason(resp, n) for resp, n in zip(r["responses"], r["response_tokens"])] for r in scored]
        rewards = [r["rewards"] for r in scored]
        picks = raft_select.select(rewards, reasons, self.args.selection, self.args.top_fraction)
        kept = [{"index": scored[i]["index"], "sample": j, "prompt": scored[i]["prompt"],
                 "completion": scored[i]["responses"][j], "reward": rewards[i][j]} for i, j in picks]
        if not kept:
            raise RuntimeError(
                f"iteration {it}: every sample was filtered out ({raft_select.filter_counts(reasons)}); "
                "loosen filter_min_tokens / filter_max_repeat_fraction / filter_patterns"
            )
        filtered = [{"index": scored[i]["index"], "sample": j, "reason": why}
                    for i, row in enumerate(reasons) for j, why in enumerate(row) if why is not None]
        if self.state.is_main_process:
            write_jsonl(filtered, d / "filtered.jsonl")
        self._write_main(kept, d / "kept.jsonl")
        return {"kept": len(kept), "filter_counts": raft_select.filter_counts(reasons)}

    def stage_train(self, it: int) -> dict[str, Any]:
        d = self.iter_dir(it)
        kept = read_jsonl(d / "kept.jsonl")
        train_ds = Dataset.from_dict({"prompt": [r["prompt"] for r in kept], "completion": [r["completion"] for r in kept]})
        policy = self.policy(it)
        if policy.trainer is not None:
            # A trainer-wrapped model (ZeRO-3 engine, DDP) is not handed to a second trainer: start from disk.
            self._free("policy")
            policy = self.policy(it)
        if self.offload:
            self._free("scorer")
        tmp = d / "policy.tmp"
        if tmp.exists() and self.state.is_main_process:
            shutil.rmtree(tmp)  # a half-written policy from an interrupted run
        self.state.wait_for_everyone()
        targs = replace(self.args, output_dir=str(tmp), seed=self.args.seed + it, stop_after=None)
        trainer = trl.SFTTrainer(model=policy.model, args=targs, train_dataset=train_ds, processing_class=self.tokenizer,
                                 peft_config=modeling.peft_config(self.model_args))
        result = trainer.train()
        modeling.save_merged(trainer, tmp, self.tokenizer)
        if self.state.is_main_process:
            (tmp / "raft_done").write_text(f"iteration {it}\n")
            final = d / "policy"
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        self.state.wait_for_everyone()
        if self.offload or modeling.peft_config(self.model_args) is not None:
            self._free("policy")
        else:
            # Keep the trained model resident for the next generate stage. Under ZeRO-3/FSDP it is sharded,
            # so generation goes through the trainer's wrapped model and unwrap_model_for_generation.
            wrapped = trainer.model_wrapped
            self._policy = _Policy(
                path=str(d / "policy"),
                model=wrapped if wrapped is not trainer.model else trainer.accelerator.unwrap_model(trainer.model),
                accelerator=trainer.accelerator if wrapped is not trainer.model else None,
                trainer=trainer if wrapped is not trainer.model else None,
            )
        return {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}

    def stage_metrics(self, it: int) -> dict[str, Any]:
        metrics = self.iteration_metrics(it)
        if self.state.is_main_process:
            write_json(metrics, self.iter_dir(it) / "metrics.json")
            self.write_reports(final=None)
        self.state.wait_for_everyone()
        return {}

    # ----- metrics -----------------------------------------------------------------------

    def heldout_metrics(self, folder: Path) -> dict[str, Any]:
        held = read_jsonl(folder / "heldout_scored.jsonl")
        if not held:
            return {}
        out: dict[str, Any] = {
            "heldout_reward": _mean([r["sampled_reward"] for r in held]),
            "heldout_greedy_reward": _mean([r["greedy_reward"] for r in held]),
        }
        if self.gold:
            prompts = [r["prompt"] for r in held]
            greedy = synthetic.gold_summary(prompts, [r["greedy"] for r in held])
            out["gold_accuracy"] = greedy["gold_accuracy"]
            out |= {k: v for k, v in greedy.items() if k.startswith("gold_accuracy_")}
            out["gold_accuracy_sampled"] = synthetic.gold_summary(prompts, [r["sampled"] for r in held])["gold_accuracy"]
        return out

    def iteration_metrics(self, it: int) -> dict[str, Any]:
        d = self.iter_dir(it)
        scored = read_jsonl(d / "scored.jsonl")
        kept = read_jsonl(d / "kept.jsonl")
        stats = {s: read_json(d / f"{s}.stats.json") for s in STAGES[:-1]}
        everything = [x for r in scored for x in r["responses"]]
        gen_seconds = stats["generate"].get("generate_seconds") or stats["generate"].get("seconds") or float("nan")
        m: dict[str, Any] = {
            "iteration": it,
            "policy": self.policy_path(it),
            "prompts": len(scored),
            "reward_first_sample": _mean([r["rewards"][0] for r in scored]),
            "reward_best_of_k": _mean([max(r["rewards"]) for r in scored]),
            "reward_mean_all": _mean([x for r in scored for x in r["rewards"]]),
            "reward_kept": _mean([r["reward"] for r in kept]),
            "kept": len(kept),
            "response_tokens_mean": _mean([n for r in scored for n in r["response_tokens"]]),
            "distinct_1": raft_select.distinct_n(everything, 1),
            "distinct_2": raft_select.distinct_n(everything, 2),
        }
        m |= self.heldout_metrics(d)
        if self.gold:
            m["gold_accuracy_first_sample"] = _mean([synthetic.gold_reward(r["prompt"], r["responses"][0]) for r in scored])
        m |= {f"filtered_{k}": v for k, v in stats["select"].get("filter_counts", {}).items()}
        m |= {f"seconds_{s}": stats[s].get("seconds") for s in STAGES[:-1]}
        m["generated_tokens_per_second"] = stats["generate"].get("generated_tokens", 0) / gen_seconds if gen_seconds else None
        m["train_loss"] = stats["train"].get("train_loss")
        return m

    def write_reports(self, final: dict[str, Any] | None) -> None:
        """The per-iteration table (JSON + Markdown) and the reward curve, from what is on disk now."""
        rows = [read_json(self.iter_dir(i) / "metrics.json") for i in range(self.args.num_iterations)]
        rows = [r for r in rows if r]
        write_json({"iterations": rows, "final": final}, self.out / "metrics_per_iteration.json")
        (self.out / "metrics.md").write_text(metrics_table(rows, final))
        plot_reward_curve(rows, final, self.out / "reward_curve.png", title=f"RAFT on {self.model_args.model_name_or_path}")

    # ----- final -------------------------------------------------------------------------

    def stage_final(self) -> dict[str, Any]:
        n = self.args.num_iterations
        fdir = self.out / "final"
        if not self.done(fdir / "heldout_scored.jsonl"):
            start = time.perf_counter()
            if not self.done(fdir / "heldout_samples.jsonl"):
                held = self._heldout_rows(n)
                self._write_main(held, fdir / "heldout_samples.jsonl")
            held = read_jsonl(fdir / "heldout_samples.jsonl")
            mine = shard(held, self.rank, self.world)
            r = self.score([x["prompt"] for x in mine] * 2, [x["sampled"] for x in mine] + [x["greedy"] for x in mine],
                           "score held-out")
            rows = [x | {"sampled_reward": r[j], "greedy_reward": r[len(mine) + j]} for j, x in enumerate(mine)]
            rows = gather_rows(rows, "position", [x["position"] for x in held])
            if self.state.is_main_process:
                write_json({"seconds": time.perf_counter() - start}, fdir / "final.stats.json")
            self._write_main(rows, fdir / "heldout_scored.jsonl")
        final = {"policy": self.policy_path(n)} | self.heldout_metrics(fdir)
        final["seconds_final_eval"] = read_json(fdir / "final.stats.json").get("seconds")
        return final

    def finish(self, final: dict[str, Any]) -> dict[str, Any]:
        rows = [read_json(self.iter_dir(i) / "metrics.json") for i in range(self.args.num_iterations)]
        first, last = rows[0], rows[-1]
        headline: dict[str, Any] = {
            "iterations": len(rows),
            "prompts_per_iteration": self.args.prompts_per_iteration,
            "num_samples": self.args.num_samples,
            "selection": self.args.selection,
            "reward_first_sample_first": first["reward_first_sample"],
            "reward_first_sample_last": last["reward_first_sample"],
            "reward_best_of_k_first": first["reward_best_of_k"],
            "reward_best_of_k_last": last["reward_best_of_k"],
            "heldout_reward_first": first.get("heldout_reward"),
            "heldout_reward_last": final.get("heldout_reward"),
        }
        if self.gold:
            # Greedy answers and one sample per held-out prompt (at the RAFT temperature: the policy RAFT
            # optimises), then the first sample on each iteration's drawn prompts (the gold twin of
            # reward_first_sample).
            headline |= {"gold_accuracy_first": first.get("gold_accuracy"), "gold_accuracy_last": final.get("gold_accuracy"),
                         "gold_accuracy_sampled_first": first.get("gold_accuracy_sampled"),
                         "gold_accuracy_sampled_last": final.get("gold_accuracy_sampled"),
                         "gold_accuracy_first_sample_first": first.get("gold_accuracy_first_sample"),
                         "gold_accuracy_first_sample_last": last.get("gold_accuracy_first_sample")}
        for s in STAGES[:-1]:
            headline[f"seconds_{s}_total"] = sum((r.get(f"seconds_{s}") or 0.0) for r in rows)
        headline["seconds_final_eval"] = final.get("seconds_final_eval")
        headline["prompt_set"] = self.prompt_report["prompt_set"]
        if self.state.is_main_process:
            self.write_reports(final)
            link_policy(Path(self.policy_path(self.args.num_iterations)), self.out)
            write_json(headline, self.out / "metrics.json")
            modelcard.write_model_card(
                self.out,
                title=f"RAFT policy from {self.model_args.model_name_or_path} (hhrm)",
                summary=(
                    f"Reward-ranked fine-tuning: {len(rows)} iterations of {self.args.prompts_per_iteration} prompts, "
                    f"K={self.args.num_samples} samples each, `{self.args.selection}` selection, scored by "
                    f"`{self.args.reward_model_name_or_path}`, fine-tuned with TRL `SFTTrainer` (completion-only loss).\n\n"
                    "![reward curve](reward_curve.png)\n\n" + metrics_table(rows, final)
                ),
                metrics=headline,
                configs={"data": self.data_args, "raft": self.args, "model": self.model_args},
                data={"source": self.splits.source, "prompt_set": self.prompt_report, "heldout_prompts": len(self.heldout)},
            )
        self.state.wait_for_everyone()
        return headline

    def close(self) -> None:
        """Free the models and leave the process group (a gloo rank can abort at exit otherwise)."""
        self._free("policy")
        self._free("scorer")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.state.wait_for_everyone()
            torch.distributed.destroy_process_group()

    def fingerprint(self) -> dict[str, Any]:
        """The settings a finished stage's outputs depend on; a resume with other values would mix two runs."""
        skip = {"progress", "stop_after", "logging_steps", "disable_tqdm", "output_dir", "offload_models",
                "generation_batch_size", "reward_batch_size", "logging_dir", "run_name"}
        raft_args = {k: v for k, v in modelcard.config_dict(self.args).items() if k not in skip}
        return {"data": modelcard.config_dict(self.data_args), "model": self.model_args.model_name_or_path,
                "raft": raft_args}

    def check_resume(self) -> None:
        previous = read_json(self.out / "run.json").get("fingerprint")
        if previous is None:
            return
        now = json.loads(json.dumps(self.fingerprint(), default=str))
        changed = sorted(f"{part}.{k}" for part in now for k in (set(now[part]) | set(previous.get(part, {})))
                         if isinstance(now[part], dict) and now[part].get(k) != previous.get(part, {}).get(k))
        if previous.get("model") != now["model"]:
            changed.append("model_name_or_path")
        if changed:
            raise ValueError(
                f"output_dir={str(self.out)!r} holds a RAFT run with other settings ({', '.join(changed[:8])}); "
                "resuming would mix two runs: use a new output_dir or delete that folder"
            )

    def run(self) -> dict[str, Any]:
        self.check_resume()
        if self.state.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json({"prompt_set": self.prompt_report, "offload_models": self.offload, "world_size": self.world,
                        "fingerprint": json.loads(json.dumps(self.fingerprint(), default=str))}, self.out / "run.json")
        self.state.wait_for_everyone()
        for it in range(self.args.num_iterations):
            d = self.iter_dir(it)
            if self.done(d / "metrics.json"):
                logger.info("iteration %d already complete", it)
                if self.stop_after and self.stop_after[0] == it:
                    raise StopRequested(f"stopped after {self.args.stop_after} (stop_after)")
                continue
            self._stage(it, "draw", d / "prompts.jsonl", lambda: self.stage_draw(it))
            self._stage(it, "generate", d / "samples.jsonl", lambda: self.stage_generate(it))
            self._stage(it, "score", d / "scored.jsonl", lambda: self.stage_score(it))
            self._stage(it, "select", d / "kept.jsonl", lambda: self.stage_select(it))
            self._stage(it, "train", d / "policy", lambda: self.stage_train(it))
            self._stage(it, "metrics", d / "metrics.json", lambda: self.stage_metrics(it))
            if self.state.is_main_process:
                m = read_json(d / "metrics.json")
                logger.info("iteration %d: %s", it, headline_line(m))
        final = self.stage_final()
        self._free("policy")
        self._free("scorer")
        return self.finish(final)


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(sum(values) / len(values)) if values else float("nan")


def link_policy(src: Path, dst: Path) -> None:
    """Put the final policy's files in ``dst`` (hard links where possible: no second copy of a 7B model)."""
    for f in src.iterdir():
        if f.is_file() and f.name != "raft_done":
            target = dst / f.name
            if target.exists():
                target.unlink()
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)


TABLE_COLUMNS = ("iteration", "reward_first_sample", "reward_best_of_k", "reward_kept", "heldout_reward",
                 "gold_accuracy", "gold_accuracy_sampled", "gold_accuracy_first_sample", "response_tokens_mean",
                 "distinct_2", "kept", "generated_tokens_per_second",
                 "seconds_generate", "seconds_score", "seconds_train")


def metrics_table(rows: list[dict[str, Any]], final: dict[str, Any] | None) -> str:
    cols = [c for c in TABLE_COLUMNS if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows + ([{"iteration": "final"} | final] if final else []):
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_reward_curve(rows: list[dict[str, Any]], final: dict[str, Any] | None, path: Path, title: str) -> None:
    """Reward per iteration (the card's figure), and gold accuracy beside it when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gold = any("gold_accuracy" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if gold else 1, figsize=(11 if gold else 6, 4), squeeze=False)
    ax = axes[0][0]
    its = [r["iteration"] for r in rows]
    ax.plot(its, [r["reward_first_sample"] for r in rows], "o-", label="policy sample (train prompts)")
    ax.plot(its, [r["reward_best_of_k"] for r in rows], "s--", label="best of K")
    held_x = its + ([len(rows)] if final else [])
    held_y = [r.get("heldout_reward") for r in rows] + ([final.get("heldout_reward")] if final else [])
    ax.plot(held_x, held_y, "^-", label="policy sample (held-out)")
    ax.set_xlabel("RAFT iteration (policy before its fine-tune)")
    ax.set_ylabel("reward")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    if gold:
        ax2 = axes[0][1]
        ax2.plot(held_x, [r.get("gold_accuracy") for r in rows] + ([final.get("gold_accuracy")] if final else []),
                 "o-", label="greedy (held-out)")
        ax2.plot(held_x, [r.get("gold_accuracy_sampled") for r in rows] + ([final.get("gold_accuracy_sampled")] if final else []),
                 "s--", label="sampled (held-out)")
        ax2.set_xlabel("RAFT iteration")
        ax2.set_ylabel("gold accuracy")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def headline_line(m: dict[str, Any]) -> str:
    keys = ("reward_first_sample", "reward_best_of_k", "heldout_reward", "gold_accuracy", "gold_accuracy_sampled", "kept",
            "seconds_generate", "seconds_train")
    return ", ".join(f"{k}={m[k]:.4g}" if isinstance(m.get(k), float) else f"{k}={m.get(k)}" for k in keys if k in m)
