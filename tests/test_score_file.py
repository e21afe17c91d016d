"""The scoring command (recipes/score.py, `make score`): every row back, in order, with the RM's own rewards."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from trl import ModelConfig

from hhrm import data
from hhrm.reporting import read_jsonl
from hhrm.reward import score_file, scoring
from hhrm.rm import stage as rm

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
    written = json.loads((tmp_path / "scores.jsonl.metrics.json").read_text())
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
    assert json.loads((tmp_path / "two.jsonl.metrics.json").read_text())["processes"] == 2
    assert json.loads((tmp_path / "two.jsonl.metrics.json").read_text())["accuracy"] == single["accuracy"]


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


# --------------------------------------------------------------------------------------------
# What would fail only at the end is refused before any model is loaded; a failed write leaves nothing half-done


@contextmanager
def tmpfs(folder: Path, options: str):
    """A tmpfs mounted on ``folder`` (a small or read-only disk); skipped where mounting is not permitted."""
    folder.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command here: the full or read-only disk cannot be made")
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip() or proc.returncode})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def refused_before_the_model(tiny, *args: str) -> str:
    """The last stderr line of recipes/score.py refused (exit 2, one line). The model is the tiny causal LM, which
    the reward-model check refuses: a refusal about anything else came before the model was loaded."""
    cmd = [sys.executable, str(ROOT / "recipes" / "score.py"), "--model_name_or_path", str(tiny["base"]), *args]
    proc = run_process(cmd, 15, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("hhrm: error:") == 1, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_outputs_that_cannot_be_written_are_refused_before_the_model(tiny, tmp_path):
    data_arg = ("--dataset_name", str(tiny["data"] / "test.jsonl"))
    (tmp_path / "a_file").write_text("")
    line = refused_before_the_model(tiny, *data_arg, "--output_file", str(tmp_path / "a_file" / "s.jsonl"))
    assert f"output_file={str(tmp_path / 'a_file' / 's.jsonl')!r}" in line and "is a file" in line
    for name in (".jsonl", ".parquet", "scores"):  # a dotfile has no suffix: it was written as Parquet, exit 0
        with pytest.raises(ValueError, match=rf"output_file='.*{name}': the file name must be <name>\.jsonl"):
            score_file.ScoreConfig(output_file=str(tmp_path / name))
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        line = refused_before_the_model(tiny, *data_arg, "--output_file", str(ro / "sub" / "s.jsonl"))
        assert f"output_file={str(ro / 'sub' / 's.jsonl')!r}: cannot write in {ro}" in line
        assert "Read-only file system" in line
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".hhrm-write-probe-*"))


def test_rows_that_do_not_fit_one_parquet_schema_are_refused_before_the_model(tiny, tmp_path):
    rows = read_jsonl(tiny["data"] / "test.jsonl")[:6]
    for i, row in enumerate(rows):
        row["meta"] = i if i != 4 else "four"  # int64 in rows 0-3, a string in row 4
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "s.parquet"
    line = refused_before_the_model(tiny, "--dataset_name", str(pairs), "--output_file", str(out))
    assert f"output_file={str(out)!r}: the rows do not fit one Parquet schema: column 'meta', first at row 4" in line
    assert "int64" in line and "write .jsonl instead" in line and not out.exists()
    # A type Parquet cannot hold at all (a struct with no field) is one line too, not Arrow's exception.
    with pytest.raises(ValueError, match=r"column 'extra', first at row 0 .*no child field"):
        score_file.write_rows([{"extra": {}}], tmp_path / "e.parquet")
    assert not list(tmp_path.glob("e.parquet*"))


def test_outputs_with_the_same_stem_keep_their_own_metrics(trained, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", trained["test"][:6])
    score(trained, tmp_path, pairs, "a.jsonl")
    score(trained, tmp_path, pairs, "a.parquet")
    for name in ("a.jsonl", "a.parquet"):
        metrics = json.loads((tmp_path / f"{name}.metrics.json").read_text())
        assert metrics["output"] == str(tmp_path / name) and metrics["rows"] == 6


def test_a_full_disk_leaves_the_old_output_whole_and_no_tmp(trained, tmp_path):
    # Rows of ~200 kB each (scored on their short texts): the 6 of them do not fit in what the disk has left.
    rows = [r | {"blob": "x" * 200_000} for r in trained["test"][:6]]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with tmpfs(tmp_path / "disk", "size=2m") as disk:
        (disk / "filler").write_bytes(b"\0" * 1_200_000)
        old = disk / "scores.jsonl"
        old.write_text('{"old": 1}\n')
        data_args = score_file.ScoreDataArguments(dataset_name=str(pairs))
        args = score_file.ScoreConfig(output_file=str(old), overwrite_output=True, progress=False)
        model = ModelConfig(model_name_or_path=str(trained["rm"]))
        with pytest.raises(ValueError, match=rf"output_file: no space left on device writing {old} \(.* MB free"):
            load_recipe("score").main(data_args, args, model)
        assert old.read_text() == '{"old": 1}\n'
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "scores.jsonl"]


# --------------------------------------------------------------------------------------------
# The reward through the seam (hhrm.reward.sources): a folder under its reward convention


def test_a_pad_is_eos_rm_is_scored_by_its_stated_convention(pad_is_eos_rm, tiny, tmp_path):
    import torch

    rows = read_jsonl(tiny["data"] / "test.jsonl")[:12]
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", rows)
    data_args = score_file.ScoreDataArguments(dataset_name=str(pairs_file))
    args = score_file.ScoreConfig(
        output_file=str(tmp_path / "s.jsonl"), reward_convention="card-pipeline", progress=False
    )
    metrics = load_recipe("score").main(data_args, args, ModelConfig(model_name_or_path=str(pad_is_eos_rm)))
    inp = score_file.read_input(data_args, None, rows)
    prompts, responses = inp.pairs(0, len(inp.table))  # per row: (prompt, chosen), (prompt, rejected)
    scorer = scoring.RewardScorer.from_pretrained(
        pad_is_eos_rm, device="cpu", dtype=torch.float32, convention="card-pipeline"
    )
    expected = scorer.score_pairs(prompts, responses)
    out = read_jsonl(tmp_path / "s.jsonl")
    got = [r[c] for r in out for c in ("chosen_reward", "rejected_reward")]
    assert len(got) == 24 and got == pytest.approx(expected, abs=1e-5)
    assert metrics["reward_convention"] == metrics["reward"]["convention"] == "card-pipeline"
    assert metrics["reward_model"] == str(pad_is_eos_rm) and metrics["scored"] == 12
    # Nothing stated for a pad == EOS folder recording nothing: refused before scoring, naming the setting.
    with pytest.raises(ValueError, match=r"pad == EOS\) and its config.json records no reward_convention") as err:
        args = score_file.ScoreConfig(output_file=str(tmp_path / "t.jsonl"), progress=False)
        load_recipe("score").main(data_args, args, ModelConfig(model_name_or_path=str(pad_is_eos_rm)))
    assert "\n" not in str(err.value) and not (tmp_path / "t.jsonl").exists()


def test_an_unknown_convention_is_refused_in_one_line(pad_is_eos_rm, tiny, tmp_path):
    cmd = [sys.executable, str(ROOT / "recipes" / "score.py"), "--model_name_or_path", str(pad_is_eos_rm)]
    cmd += ["--dataset_name", str(tiny["data"] / "test.jsonl"), "--output_file", str(tmp_path / "s.jsonl")]
    proc = run_process([*cmd, "--reward_convention", "nope"], 15, cwd=ROOT)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hhrm: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "reward_convention='nope' is not a reward convention: one of hhrm, card-pipeline" in lines[0]
    with pytest.raises(ValueError, match="model_name_or_path='a' and reward_model_name_or_path='b' name two"):
        score_file.reward_arguments(score_file.ScoreConfig(output_file="s.jsonl", reward_model_name_or_path="b"), "a")
