import gzip
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from hhrm import data, formats


def _dahoas_row(i: int) -> dict:
    return {
        "prompt": f"\n\nHuman: question {i}?\n\nAssistant:",
        "response": f" answer {i}",
        "chosen": f" good answer {i}",
        "rejected": f" bad answer {i}",
    }


def _write_jsonl(path, rows, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


@pytest.fixture
def dahoas_dir(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [_dahoas_row(i) for i in range(40)])
    _write_jsonl(tmp_path / "test.jsonl.gz", [_dahoas_row(100 + i) for i in range(20)], gz=True)
    return tmp_path


def test_card_splits_on_dahoas_schema(dahoas_dir):
    splits = data.load_splits(data.DataArguments(dataset_name=str(dahoas_dir), test_offset=5))
    assert splits.source["format"] == "dahoas"
    assert len(splits.train) == 45 and len(splits.test) == 15
    # The first 5 test rows joined training, in order, after all train rows.
    assert splits.train[40]["prompt"] == "###Human: question 100? ###Assistant:"
    assert splits.test[0]["prompt"] == "###Human: question 105? ###Assistant:"
    assert splits.train[0]["chosen"] == " good answer 0" and splits.train[0]["rejected"] == " bad answer 0"
    assert data.overlapping_pairs(splits.train, splits.test) == []
    sft = splits.sft_texts()
    assert len(sft) == 45 and sft[0]["text"] == "###Human: question 0? ###Assistant: good answer 0"


def test_offset_larger_than_test_split_is_reported(dahoas_dir):
    with pytest.raises(ValueError, match="test_offset=50"):
        data.load_splits(data.DataArguments(dataset_name=str(dahoas_dir), test_offset=50))


def test_bad_config_values_fail_early():
    with pytest.raises(ValueError, match="dataset_format"):
        data.DataArguments(dataset_format="csv")
    with pytest.raises(ValueError, match="test_offset"):
        data.DataArguments(test_offset=-1)


def test_missing_local_data_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        data.read_rows(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.read_rows(str(tmp_path / "nope" / "deeper"), "train")


def test_bad_rows_counted_by_reason(tmp_path):
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    bad = [
        {"chosen": good["chosen"]},  # missing_field
        {"chosen": 3, "rejected": good["rejected"]},  # not_string
        {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"},  # no_assistant_turn
        {"chosen": "\n\nHuman: hi\n\nAssistant:  ", "rejected": good["rejected"]},  # empty_response
        {"chosen": good["chosen"], "rejected": good["chosen"]},  # identical_responses
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: hello",
            "rejected": "\n\nHuman: hey\n\nAssistant: no",
        },  # prompt_mismatch
        {"chosen": "junk\n\nHuman: hi\n\nAssistant: a", "rejected": "junk\n\nHuman: hi\n\nAssistant: b"},  # malformed
        "{not json",  # unparsable_json
    ]
    _write_jsonl(tmp_path / "train.jsonl", [good, *bad, good])
    rows = data.read_rows(str(tmp_path), "train")
    ds, report = data.normalize_rows(rows, "raw", "train")
    assert len(ds) == 2
    assert dict(report.counts) == {
        "missing_field": 1,
        "not_string": 1,
        "no_assistant_turn": 1,
        "empty_response": 1,
        "identical_responses": 1,
        "prompt_mismatch": 1,
        "malformed_dialogue": 1,
        "unparsable_json": 1,
    }
    assert report.examples["missing_field"] == ["train[1]"]
    assert "train[6]" in report.summary("train")
    assert report.to_dict()["dropped"] == 8 and report.seen == 10


def test_raw_loader_on_real_hh_sample(hh_sample):
    rows = data.read_rows(str(hh_sample), "test")
    assert len(rows) == 1156 and formats.detect(rows) == "raw"
    ds, report = data.normalize_rows(rows, "raw", "test")
    assert len(ds) + report.dropped == 1156
    assert report.dropped < 20
    for row in ds.select(range(200)):
        assert row["prompt"].startswith("###Human:") and row["prompt"].endswith(" ###Assistant:")
        assert "\n\nHuman:" not in row["prompt"] and "\n\nAssistant:" not in row["chosen"]
        assert row["chosen"].startswith(" ") and row["chosen"] != row["rejected"]


def test_distinct_prompts_keeps_first_occurrence_order():
    assert data.distinct_prompts(["b", "a", "b", "c", "a", "d"], 3) == ["b", "a", "c"]
    assert data.distinct_prompts(["a", "a"], 5) == ["a"]


def test_data_report_has_percentiles_and_drops(dahoas_dir, tiny):
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    splits = data.load_splits(data.DataArguments(dataset_name=str(dahoas_dir), test_offset=5))
    report = data.data_report(splits, tok)
    assert report["train"]["pairs"] == 45 and report["test"]["pairs"] == 15
    assert report["train"]["chosen_tokens"]["p50"] > 0
    assert report["bad_rows"]["train"]["dropped"] == 0
    assert report["train_test_overlap"] == 0


# --------------------------------------------------------------------------------------------
# Splits that are empty or mostly bad are refused; row limits are checked


def _raw_pair(i: int) -> dict:
    return {"chosen": f"\n\nHuman: q{i}?\n\nAssistant: yes {i}", "rejected": f"\n\nHuman: q{i}?\n\nAssistant: no {i}"}


BAD_ROW = {"chosen": "\n\nHuman: hi"}  # missing_field


def test_row_limits_must_be_at_least_one():
    for name, value in (("max_train_rows", 0), ("max_train_rows", -5), ("max_test_rows", 0), ("max_test_rows", -1)):
        with pytest.raises(ValueError, match=rf"{name}={value}: must be >= 1"):
            data.DataArguments(**{name: value})
    for value in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="max_bad_row_fraction"):
            data.DataArguments(max_bad_row_fraction=value)
    assert data.DataArguments(max_train_rows=1, max_test_rows=1).max_bad_row_fraction == 0.1


def test_empty_train_file_is_refused_even_with_moved_test_rows(dahoas_dir):
    (dahoas_dir / "train.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"dataset_name=.*'train' split \(.*train\.jsonl\) has no rows"):
        data.load_splits(data.DataArguments(dataset_name=str(dahoas_dir), test_offset=10))


def test_train_split_without_a_usable_pair_is_refused(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [BAD_ROW] * 4)
    _write_jsonl(tmp_path / "test.jsonl", [BAD_ROW] * 3 + [_raw_pair(i) for i in range(3)])
    args = data.DataArguments(dataset_name=str(tmp_path), test_offset=2, max_bad_row_fraction=1.0)
    with pytest.raises(ValueError, match=r"no usable training pair .*missing_field=6 \(e\.g\. train\[0\]"):
        data.load_splits(args)


def test_split_with_too_many_bad_rows_is_refused(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [_raw_pair(i) if i not in (3, 7) else BAD_ROW for i in range(10)])
    _write_jsonl(tmp_path / "test.jsonl", [_raw_pair(100 + i) for i in range(6)])
    with pytest.raises(ValueError) as err:
        data.load_splits(data.DataArguments(dataset_name=str(tmp_path), test_offset=0))
    message = str(err.value)
    for part in (
        "RM-train split",
        "20.0%",
        "2 of 10",
        "missing_field=2 (e.g. train[3], train[7])",
        "max_bad_row_fraction=0.1",
    ):
        assert part in message, (part, message)
    splits = data.load_splits(data.DataArguments(dataset_name=str(tmp_path), test_offset=0, max_bad_row_fraction=0.2))
    assert len(splits.train) == 8 and splits.drops["train"].dropped == 2


def test_test_split_all_bad_is_refused_but_empty_by_offset_is_not(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [_raw_pair(i) for i in range(10)])
    _write_jsonl(tmp_path / "test.jsonl", [_raw_pair(100), _raw_pair(101), BAD_ROW, BAD_ROW])
    with pytest.raises(ValueError, match=r"100\.0% of the RM-test split.*test\[2\], test\[3\].*max_bad_row_fraction"):
        data.load_splits(data.DataArguments(dataset_name=str(tmp_path), test_offset=2))
    # test_offset takes every test row: the RM test is empty, which the evaluation handles later.
    _write_jsonl(tmp_path / "test.jsonl", [_raw_pair(100), _raw_pair(101)])
    splits = data.load_splits(data.DataArguments(dataset_name=str(tmp_path), test_offset=2))
    assert len(splits.train) == 12 and len(splits.test) == 0


# --------------------------------------------------------------------------------------------
# Chunked normalisation and token counts give the same values as one pass


def test_chunked_normalisation_and_lengths_match_one_pass(tmp_path, tiny, monkeypatch):
    from hhrm.reward import scoring

    tok = AutoTokenizer.from_pretrained(tiny["base"])
    rows = [_raw_pair(i) for i in range(23)] + [BAD_ROW, _raw_pair(3)]
    whole, whole_report = data.normalize_rows(rows, "raw", "train")
    monkeypatch.setattr(data, "CHUNK_ROWS", 4)
    monkeypatch.setattr(data, "LENGTH_CHUNK", 5)
    ds, report = data.normalize_rows(rows, "raw", "train")
    assert ds.to_dict() == whole.to_dict() and len(ds) == 24 and report.to_dict() == whole_report.to_dict()
    lc, lr = data.pair_lengths(ds, tok)
    assert lc.dtype == np.int32 and lr.dtype == np.int32
    assert list(lc) == [len(scoring.encode(tok, [p + c])[0]) for p, c in zip(ds["prompt"], ds["chosen"])]
    assert list(lr) == [len(scoring.encode(tok, [p + r])[0]) for p, r in zip(ds["prompt"], ds["rejected"])]
    # The first three test pairs occur in train (one of them twice), found across chunk boundaries.
    test = ds.select([23, 5, 3]).add_item({"prompt": "###Human: x ###Assistant:", "chosen": " a", "rejected": " b"})
    assert data.overlapping_pairs(ds, test) == [0, 1, 2]
    assert data.overlapping_pairs(ds, ds.select([])) == [] and data.overlapping_pairs(ds.select([]), test) == []


def test_text_rule_option_and_row_index():
    args = data.DataArguments()
    assert args.use_chat_template is False and data.text_rule(args).name == "hh"
    assert "chat template" in data.DataArguments.__dataclass_fields__["use_chat_template"].metadata["help"]
    rows = [_raw_pair(0), BAD_ROW, _raw_pair(2)]
    ds, report = data.normalize_rows(rows, "auto", "train", first_index=7)
    assert (
        ds.column_names == [*data.COLUMNS, "row"]
        and ds["row"] == [7, 9]
        and report.examples == {"missing_field": ["train[8]"]}
    )
    ds, _ = data.normalize_rows(rows, "raw", "train", keep_index=False)
    assert ds.column_names == list(data.COLUMNS)
