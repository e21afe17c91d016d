"""The scoring command (recipes/score.py, `make score`): every row back, in order, with the RM's own rewards."""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import pytest
from trl import ModelConfig

from hhrm import data, rm, score_file, scoring
from hhrm.reporting import read_jsonl

from conftest import load_recipe, run_process, two_process_launch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> dict:
    """A small reward model trained by the RM recipe, its metrics, and the held-out pairs it was evaluated on."""
    out = tmp_path_factory.mktemp("score") / "rm"
    data_args = data.DataArguments(dataset_name=str(tiny["data"]), test_offset=100)
    args = rm.RewardConfig(
        output_dir=str(out),
        max_steps=30,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        activation_checkpointing=False,
        save_strategy="no",
        report_to="none",
        gold_prompts=0,
        eval_before_training=False,
        disable_tqdm=True,
        seed=0,
    )
    metrics = load_recipe("rm").main(data_args, args, ModelConfig(model_name_or_path=str(tiny["base"])))
    scorer = scoring.RewardScorer.from_pretrained(out)
    pairs = rm.prepare_pairs(data.load_splits(data_args), scorer.tokenizer, args.max_length, args.dedup_test)
    test = pairs.test.select_columns(["prompt", "chosen", "rejected"]).to_list()
    return {"rm": out, "metrics": metrics, "test": test, "scorer": scorer}


def score(trained, tmp_path: Path, input_file: Path, output_name: str = "scores.jsonl", **data_kw) -> dict:
    data_args = score_file.ScoreDataArguments(dataset_name=str(input_file), **data_kw)
    args = score_file.ScoreConfig(output_file=str(tmp_path / output_name), progress=False)
    return load_recipe("score").main(data_args, args, ModelConfig(model_name_or_path=str(trained["rm"])))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def conversational(row: dict) -> dict:
    """An hhrm pair (### strings) as TRL's conversational explicit-prompt row."""
    from hhrm import formatting

    turns = formatting.parse_turns(row["prompt"])[:-1]
    prompt = [{"role": "user" if r == "Human" else "assistant", "content": t} for r, t in turns]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
    }


def test_scoring_the_held_out_pairs_reproduces_the_rm_accuracy(trained, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", trained["test"])
    metrics = score(trained, tmp_path, pairs)
    assert metrics["kind"] == "pairs" and metrics["rows"] == metrics["scored"] == len(trained["test"])
    assert metrics["accuracy"] == trained["metrics"]["eval_accuracy_exact"]
    rows = read_jsonl(tmp_path / "scores.jsonl")
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows] == trained["test"]  # order, content
    expected = trained["scorer"].score([r["prompt"] + r["chosen"] for r in trained["test"][:20]])
    assert [r["chosen_reward"] for r in rows[:20]] == pytest.approx(expected, abs=1e-5)
    written = json.loads((tmp_path / "scores.metrics.json").read_text())
    assert written["accuracy"] == metrics["accuracy"]


def test_conversational_pairs_with_bad_rows_come_back_whole_as_parquet(trained, tmp_path):
    import pyarrow.parquet as pq

    good = [conversational(r) for r in trained["test"][:30]]
    bad = [
        {"prompt": [{"content": "no role"}], "chosen": good[0]["chosen"], "rejected": good[0]["rejected"]},
        {"prompt": [], "chosen": good[0]["chosen"], "rejected": good[0]["rejected"]},
    ]
    lines = good[:10] + bad[:1] + good[10:20] + ["{not json"] + good[20:] + bad[1:]
    metrics = score(trained, tmp_path, write_jsonl(tmp_path / "conv.jsonl", lines), "scores.parquet")
    rows = pq.read_table(tmp_path / "scores.parquet").to_pylist()
    assert len(rows) == len(lines) == metrics["rows"] and metrics["scored"] == 30 and metrics["bad_rows"] == 3
    reasons = [r["bad_row"] for r in rows if r["bad_row"]]
    assert len(reasons) == 3 and "unparsable_json" in reasons
    assert [i for i, r in enumerate(rows) if r["chosen_reward"] is None] == [10, 21, 32]
    # Same rewards as the ### rows they were made from (the one text rule, whatever the input format).
    direct = trained["scorer"].score([r["prompt"] + r["chosen"] for r in trained["test"][:10]])
    assert [r["chosen_reward"] for r in rows[:10]] == pytest.approx(direct, abs=1e-5)


def test_prompt_response_rows_get_one_reward_each(trained, tmp_path):
    rows = [{"prompt": r["prompt"], "response": r["chosen"], "id": i} for i, r in enumerate(trained["test"][:12])]
    metrics = score(trained, tmp_path, write_jsonl(tmp_path / "resp.jsonl", rows), input_kind="responses")
    out = read_jsonl(tmp_path / "scores.jsonl")
    assert metrics["kind"] == "responses" and metrics["scored"] == 12 and [r["id"] for r in out] == list(range(12))
    expected = trained["scorer"].score_pairs([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert [r["reward"] for r in out] == pytest.approx(expected, abs=1e-5)
    # TRL's prompt-completion rows with a plain-text prompt (one user message), detected as such.
    plain = [{"prompt": "plain question?", "completion": " plain answer."}]
    score(trained, tmp_path, write_jsonl(tmp_path / "plain_in.jsonl", plain), "plain.jsonl")
    expected = trained["scorer"].score(["###Human: plain question? ###Assistant: plain answer."])
    assert read_jsonl(tmp_path / "plain.jsonl")[0]["reward"] == pytest.approx(expected[0], abs=1e-5)


@pytest.mark.slow
def test_two_processes_score_each_row_once(trained, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", trained["test"])
    single = score(trained, tmp_path, pairs, "one.jsonl")
    cmd = two_process_launch(
        str(ROOT / "recipes" / "score.py"),
        *("--model_name_or_path", str(trained["rm"]), "--dataset_name", str(pairs)),
        *("--output_file", str(tmp_path / "two.jsonl"), "--progress", "false"),
    )
    proc = run_process(cmd, 60, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "two.jsonl")
    assert len(two) == len(one) and [r["prompt"] + r["chosen"] for r in two] == [
        r["prompt"] + r["chosen"] for r in one
    ]
    assert [r["chosen_reward"] for r in two] == pytest.approx([r["chosen_reward"] for r in one], abs=1e-5)
    assert json.loads((tmp_path / "two.metrics.json").read_text())["processes"] == 2
    assert json.loads((tmp_path / "two.metrics.json").read_text())["accuracy"] == single["accuracy"]


def test_refusals_name_the_setting(trained, tiny, tmp_path):
    def refused(*args: str) -> str:
        cmd = [sys.executable, str(ROOT / "recipes" / "score.py"), *args]
        proc = run_process(cmd, 20, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr[-2000:]
        return proc.stderr.strip().splitlines()[-1]

    pairs = write_jsonl(tmp_path / "pairs.jsonl", trained["test"][:5])
    (tmp_path / "exists.jsonl").write_text("{}\n")
    common = ("--model_name_or_path", str(trained["rm"]), "--dataset_name", str(pairs))
    assert "output_file" in refused(*common, "--output_file", str(tmp_path / "exists.jsonl"))
    assert "output_file" in refused(*common, "--output_file", str(tmp_path / "x.csv"))
    neither = write_jsonl(tmp_path / "neither.jsonl", [{"question": "q", "answer": "a"}])
    line = refused(
        "--model_name_or_path", str(trained["rm"]), "--dataset_name", str(neither), "--output_file", "o.jsonl"
    )
    assert "input_kind" in line and "question" in line
    line = refused("--model_name_or_path", str(tiny["base"]), "--dataset_name", str(pairs), "--output_file", "o.jsonl")
    assert "model_name_or_path" in line
    assert not Path(ROOT / "o.jsonl").exists()
    with gzip.open(tmp_path / "empty.jsonl.gz", "wt") as f:
        f.write("")
    assert "no rows" in refused(
        *common[:2], "--dataset_name", str(tmp_path / "empty.jsonl.gz"), "--output_file", "o.jsonl"
    )
