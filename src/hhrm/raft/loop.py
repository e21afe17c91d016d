"""The RAFT loop: draw prompts, generate K samples, score, select, fine-tune; resumable stage by stage."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import trl
from accelerate.utils import broadcast_object_list, gather_object

import hhrm.raft.alarm as alarm
import hhrm.raft.rbon as rbon
import hhrm.raft.update as update
from hhrm import data as hdata
from hhrm import model_checks, modeling, reporting, runtime, synthetic
from hhrm.outputs import check_output_dir, release_output_dir
from hhrm.raft.config import NothingToTrain, RaftConfig, StopRequested
from hhrm.raft.files import (
    check_resume,
    fine_tune_space,
    gather_rows,
    is_done,
    iter_dir,
    link_policy,
    publish_policy,
    run_fingerprint,
    setting_defaults,
    shard,
)
from hhrm.raft.models import ModelResidency
from hhrm.raft.prompts import draw_prompts, prompt_set
from hhrm.raft.report import (
    ITERATION_HEADLINE,
    heldout_metrics,
    iteration_metrics,
    iteration_rows,
    model_card,
    run_headline,
    run_selection_rule,
    write_run_reports,
)
from hhrm.raft.select import filter_counts, select_pairs
from hhrm.reporting import read_json, read_jsonl

logger = logging.getLogger(__name__)
JUNK_FIX = "loosen the junk filter (filter_min_tokens / filter_max_repeat_fraction / filter_patterns)"


class RaftRunner:
    """One RAFT run; :meth:`run` executes (or resumes) every stage and returns the headline metrics."""

    def __init__(self, args: RaftConfig, data_args: hdata.DataArguments, model_args: trl.ModelConfig):
        self.args, self.data_args, self.model_args = args, data_args, model_args
        model_checks.check_policy(model_args, modeling.trust_remote_code(model_args, args))  # before any work
        self.state = runtime.process_state(args)  # ddp_timeout also bounds RAFT's own gathers and barriers
        self.out = check_output_dir(args.output_dir, "raft")
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.tokenizer = modeling.load_tokenizer(model_args, padding_side="right", args=args)
        self.splits = hdata.load_splits(data_args, self.tokenizer)
        self.prompts, self.prompt_report = prompt_set(self.splits, self.tokenizer, args.max_prompt_tokens)
        draw_prompts(len(self.prompts), args.prompts_per_iteration, args.seed, 0)  # fail now on a too-large draw
        self.heldout = hdata.heldout_prompts(self.splits, args.heldout_prompts)
        self.gold = synthetic.is_gold_checkable(self.heldout)
        self.models = ModelResidency(args, model_args, self.tokenizer, self.state, self.splits.source["text_rule"])
        kind = "RAFT" if args.update == "sft" else "Iterative DPO"
        self.title = f"{kind} on {model_args.model_name_or_path}"

    # ----- the algorithm -----------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        identity = self.models.rewards.identity()
        fingerprint = run_fingerprint(self.args, self.data_args, self.model_args, self.world, identity)
        check_resume(self.out, fingerprint, setting_defaults(raft=self.args, data=self.data_args))
        alarm.check_source(self.args, self.models.rewards)  # the disagreement alarm needs an ensemble
        run = {"prompt_set": self.prompt_report, "offload_models": self.models.offload, "world_size": self.world}
        if self.state.is_main_process:
            reporting.write_json(run | {"fingerprint": fingerprint}, self.out / "run.json")
        self.state.wait_for_everyone()
        # The alarm with stop_on_alarm ends the loop at its iteration i: policy i is the final one (also on a rerun).
        last = next((it for it in range(self.args.num_iterations) if self.iteration(it)), self.args.num_iterations)
        final = self.final_evaluation(last)
        self.release_models()
        return self.finish(final, last)

    def iteration(self, it: int) -> bool:
        """Run (or resume) iteration ``it``'s stages; True when the over-optimisation alarm stops the run there."""
        d = iter_dir(self.out, it)
        if self.done(d / "metrics.json"):
            logger.info("iteration %d already complete", it)
            if self.args.stop_point and self.args.stop_point[0] == it:
                raise StopRequested(f"stopped after {self.args.stop_after} (stop_after)")
            return alarm.stopped_at(d / "metrics.json")
        self.stage(it, "draw", d / "prompts.jsonl", self.draw)
        self.stage(it, "generate", d / "samples.jsonl", self.generate)
        self.stage(it, "score", d / "scored.jsonl", self.score)
        self.stage(it, "select", d / "kept.jsonl", self.select)
        # Decided from the run folder alone (every rank alike); a stop skips the alarmed fine-tune.
        stop = bool(self.args.stop_on_alarm) and alarm.evaluate(d, iter_dir(self.out, 0), it, self.args)["alarm_stop"]
        if not stop:
            with fine_tune_space(d, self.policy_path(it), self.model_args.dtype, self.state.is_main_process):
                self.stage(it, "train", d / "policy", self.train)
        self.stage(it, "metrics", d / "metrics.json", self.metrics)
        if self.state.is_main_process:
            logger.info("iteration %d: %s", it, reporting.headline(read_json(d / "metrics.json"), ITERATION_HEADLINE))
        return stop

    def draw(self, it: int) -> dict[str, Any]:
        idx = draw_prompts(len(self.prompts), self.args.prompts_per_iteration, self.args.seed, it)
        self.write_main(
            [{"index": i, "prompt": self.prompts[i]} for i in idx], iter_dir(self.out, it) / "prompts.jsonl"
        )
        return {"prompts": len(idx)}

    def generate(self, it: int) -> dict[str, Any]:
        d = iter_dir(self.out, it)
        drawn = read_jsonl(d / "prompts.jsonl")
        mine = shard(drawn, self.rank, self.world)
        stats: dict[str, Any] = {}
        responses = self.models.generate(
            self.policy_path(it),
            [r["prompt"] for r in mine],
            self.args.num_samples,
            self.args.sampling,
            self.args.seed_for(it, 1, self.rank),
            stats,
        )
        rows = [
            {
                "index": r["index"],
                "rank": self.rank,
                "prompt": r["prompt"],
                "responses": resp,
                "response_tokens": self.models.token_counts(resp),
            }
            for r, resp in zip(mine, responses)
        ]
        if self.args.selection_kl_beta > 0:  # regularised selection: log pi under the policy that drew them
            rbon.add_response_logprobs(self.models.policy(self.policy_path(it)), self.tokenizer, rows, self.args)
        held = self.heldout_answers(it)
        rows = gather_rows(rows, "index", [r["index"] for r in drawn])
        totals = gather_object([stats.get("generated_tokens", 0)])
        if self.state.is_main_process:
            reporting.write_jsonl(held, d / "heldout_samples.jsonl")
        self.write_main(rows, d / "samples.jsonl")
        return {
            "generated_tokens": int(sum(totals)),
            "generate_seconds": stats.get("seconds"),
            "heldout_prompts": len(held),
        }

    def score(self, it: int) -> dict[str, Any]:
        d = iter_dir(self.out, it)
        samples = read_jsonl(d / "samples.jsonl")
        k = self.args.num_samples
        mine = shard(samples, self.rank, self.world)
        got = self.models.score_spread(
            [r["prompt"] for r in mine for _ in range(k)],
            [x for r in mine for x in r["responses"]],
            f"score ({len(samples) * k} samples)",
        )  # an ensemble's members' std and mean stay beside each reward (hhrm.raft.alarm)
        rows = [r | {"rewards": got["reward"][n * k : (n + 1) * k]} | alarm.spread(got, n * k, (n + 1) * k) for n, r
                in enumerate(mine)]  # fmt: skip
        held = self.score_heldout(read_jsonl(d / "heldout_samples.jsonl"))
        rows = gather_rows(rows, "index", [r["index"] for r in samples])
        if self.state.is_main_process:
            reporting.write_jsonl(held, d / "heldout_scored.jsonl")
        self.write_main(rows, d / "scored.jsonl")
        return {"scored_texts": len(samples) * k + 2 * len(held)}

    def select(self, it: int) -> dict[str, Any]:
        d = iter_dir(self.out, it)
        scored = read_jsonl(d / "scored.jsonl")
        reasons = [
            [self.args.junk_filter.reason(resp, n) for resp, n in zip(r["responses"], r["response_tokens"])]
            for r in scored
        ]
        rewards = [r["rewards"] for r in scored]
        if self.args.update == "dpo":
            pairs, skipped = select_pairs(rewards, reasons, self.args.pair_margin)
            kept = update.pair_rows(scored, pairs, rewards)
            fix = f"lower pair_margin, raise num_samples or temperature, or {JUNK_FIX}"
        else:
            kept = rbon.kept_set(scored, reasons, rewards, self.args, it)  # best-of-K: plain, regularised or soft
            skipped = {"no_valid_sample": sum(all(why is not None for why in row) for row in reasons)}
            fix = JUNK_FIX
        counts = filter_counts(reasons)
        if not kept:
            raise NothingToTrain(
                f"iteration {it}: nothing to train on (update={self.args.update}): of {len(scored)} prompts, "
                f"skipped {skipped}; samples {counts}. {fix}; the run stops here and resumes from this iteration"
            )
        filtered = [
            {"index": scored[i]["index"], "sample": j, "reason": why}
            for i, row in enumerate(reasons)
            for j, why in enumerate(row)
            if why is not None
        ]
        if self.state.is_main_process:
            reporting.write_jsonl(filtered, d / "filtered.jsonl")
        self.write_main(kept, d / "kept.jsonl")
        return {"kept": len(kept), "filter_counts": counts, "skipped": skipped} | run_selection_rule(self.args, True)

    def train(self, it: int) -> dict[str, Any]:
        d = iter_dir(self.out, it)
        path = self.policy_path(it)
        policy = self.models.policy_for_training(path)
        tmp, cache = d / "policy.tmp", update.cache_dir(d / "policy.tmp")
        if self.state.is_main_process:  # a half-written policy and its datasets' cache from an interrupted run
            for folder in (tmp, cache):
                shutil.rmtree(folder, ignore_errors=True)
        self.state.wait_for_everyone()
        kept = d / "kept.jsonl"
        trainer = update.build_trainer(self.args, self.model_args, policy.model, path, self.tokenizer, kept, tmp, it)
        reporting.set_tensorboard_dir(trainer, self.out / "runs" / d.name)  # not inside the policy folder
        result = trainer.train()
        update.check_trained(trainer, result, self.args, it)  # a NaN policy is never saved nor marked done
        modeling.save_merged(trainer, tmp, self.tokenizer)
        if self.state.is_main_process:
            publish_policy(tmp, d / "policy", it)
            shutil.rmtree(cache, ignore_errors=True)
        self.state.wait_for_everyone()
        self.models.keep_trained(trainer, str(d / "policy"))
        return update.train_stats(trainer, result.metrics)

    def metrics(self, it: int) -> dict[str, Any]:
        if self.state.is_main_process:
            d = iter_dir(self.out, it)
            row = iteration_metrics(d, it, self.policy_path(it), self.gold)
            row |= alarm.evaluate(d, iter_dir(self.out, 0), it, self.args, log=True)
            reporting.write_json(row, d / "metrics.json")
            rows = iteration_rows(self.out, self.args.num_iterations)
            write_run_reports(self.out, rows, None, self.title, self.args.report_to)
        self.state.wait_for_everyone()
        return {}

    def final_evaluation(self, n: int) -> dict[str, Any]:
        """Final policy ``n``'s answers to the held-out prompts, scored (a stage of its own: ``final/``)."""
        fdir = self.out / "final"
        if not self.done(fdir / "heldout_scored.jsonl"):
            start = time.perf_counter()
            if not self.done(fdir / "heldout_samples.jsonl"):
                self.write_main(self.heldout_answers(n), fdir / "heldout_samples.jsonl")
            held = self.score_heldout(read_jsonl(fdir / "heldout_samples.jsonl"))
            if self.state.is_main_process:
                reporting.write_json({"seconds": time.perf_counter() - start}, fdir / "final.stats.json")
            self.write_main(held, fdir / "heldout_scored.jsonl")
        final = {"policy": self.policy_path(n)} | heldout_metrics(read_jsonl(fdir / "heldout_scored.jsonl"), self.gold)
        final["seconds_final_eval"] = read_json(fdir / "final.stats.json").get("seconds")
        return final

    def finish(self, final: dict[str, Any], last: int) -> dict[str, Any]:
        """The output folder: final policy ``last``'s files, the run's metrics, table, curve and model card."""
        rows = iteration_rows(self.out, self.args.num_iterations)
        headline = run_headline(rows, final, self.args, self.prompt_report["prompt_set"], self.gold)
        headline |= alarm.headline(rows, last)
        if self.state.is_main_process:
            write_run_reports(self.out, rows, final, self.title, self.args.report_to)
            link_policy(Path(self.policy_path(last)), self.out)
            configs = {"data": self.data_args, "raft": self.args, "model": self.model_args}
            data = {"source": self.splits.source, "prompt_set": self.prompt_report}
            card = model_card(rows, final, headline, configs, data | {"heldout_prompts": len(self.heldout)})
            reporting.write_json(headline, self.out / "metrics.json")
            card.write(self.out)
        self.state.wait_for_everyone()
        return headline

    # ----- held-out prompts (every iteration and the final policy) ------------------------

    def heldout_answers(self, it: int) -> list[dict[str, Any]]:
        """Policy ``it``'s sampled and greedy answers to the fixed held-out prompts (sharded, gathered)."""
        positions = list(range(len(self.heldout)))
        mine = shard(positions, self.rank, self.world)
        prompts = [self.heldout[i] for i in mine]
        path = self.policy_path(it)
        sampled = self.models.generate(path, prompts, 1, self.args.sampling, self.args.seed_for(it, 2, self.rank), {})
        greedy = self.models.generate(path, prompts, 1, self.args.greedy, self.args.seed_for(it, 3, self.rank), {})
        rows = [
            {"position": i, "prompt": p, "sampled": s[0], "greedy": g[0]}
            for i, p, s, g in zip(mine, prompts, sampled, greedy)
        ]
        return gather_rows(rows, "position", positions)

    def score_heldout(self, held: list[dict[str, Any]]) -> list[dict[str, Any]]:
        mine = shard(held, self.rank, self.world)
        got = self.models.score_spread(
            [x["prompt"] for x in mine] * 2, [x["sampled"] for x in mine] + [x["greedy"] for x in mine], "held-out"
        )
        r, m = got["reward"], len(mine)
        rows = [x | {"sampled_reward": r[j], "greedy_reward": r[m + j]} | alarm.heldout_spread(got, j, m) for j, x
                in enumerate(mine)]  # fmt: skip
        return gather_rows(rows, "position", [x["position"] for x in held])

    # ----- stage plumbing ----------------------------------------------------------------

    def policy_path(self, iteration: int) -> str:
        """Policy ``i`` (the one iteration ``i`` samples from): the start model, then each fine-tune's output."""
        if iteration == 0:
            return self.model_args.model_name_or_path
        return str(iter_dir(self.out, iteration - 1) / "policy")

    def done(self, marker: Path) -> bool:
        """Whether a stage output exists, as rank 0 sees it, on every rank.

        Each rank checking the file itself is a race: rank 0 may write the marker of a stage (metrics)
        before a slower rank has checked it, and that rank would then skip the stage's barriers."""
        answer = [is_done(marker)]
        if self.world > 1:
            broadcast_object_list(answer, from_process=0)
        return answer[0]

    def stage(self, it: int, name: str, marker: Path, work: Callable[[int], dict[str, Any] | None]) -> None:
        """Run ``work(it)`` unless ``marker`` exists; record its wall time; honour ``stop_after``."""
        if not self.done(marker):
            start = time.perf_counter()
            stats = work(it) or {}
            stats["seconds"] = time.perf_counter() - start
            if self.state.is_main_process:
                reporting.write_json(stats, iter_dir(self.out, it) / f"{name}.stats.json")
            self.state.wait_for_everyone()
        else:
            logger.info("iteration %d: %s already done, skipping", it, name)
        if self.args.stop_point == (it, name):
            raise StopRequested(f"stopped after {it}:{name} (stop_after)")

    def write_main(self, rows: list[dict[str, Any]], path: Path) -> None:
        if self.state.is_main_process:
            reporting.write_jsonl(rows, path)
        self.state.wait_for_everyone()

    # ----- resume and shutdown -----------------------------------------------------------

    def release_models(self) -> None:
        """Free the policy and the reward model (a later stage loads what it needs again)."""
        self.models.release()

    def close(self, failed: bool = False) -> None:
        """Free the models and leave the process group (a gloo rank can abort at exit otherwise). After a failure
        no barrier: the other ranks may never reach it, and this rank's error must be printed, not wait forever."""
        release_output_dir(self.out)  # the run is over: a re-run (a subprocess too) may lock the folder
        self.release_models()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if not failed:
                self.state.wait_for_everyone()
            torch.distributed.destroy_process_group()
