"""Reading input files: line ends, bytes that are not UTF-8, damaged files, schema detection, local vs hub names."""

import gzip
import json

import pytest

from hhrm import data, data_io, formats, synthetic


def _raw_rows(n: int, seed: int = 3) -> list[dict]:
    return synthetic.generate(n, seed=seed)


def _write_lines(path, lines: list, newline: str = "\n") -> None:
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + newline for x in lines)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(text.encode("utf-8"))


def _as_dict(splits: data.PreferenceSplits) -> dict:
    return {"train": splits.train.to_dict(), "test": splits.test.to_dict()}


def _crlf(row: dict, sep: str = "\r\n") -> dict:
    return {k: v.replace("\n", sep) for k, v in row.items()}


# 1. CRLF


def test_crlf_dialogues_load_like_lf(tmp_path):
    train, test = _raw_rows(30), _raw_rows(12, seed=4)
    lf, crlf = tmp_path / "lf", tmp_path / "crlf"
    lf.mkdir(), crlf.mkdir()
    _write_lines(lf / "train.jsonl", train)
    _write_lines(lf / "test.jsonl", test)
    # CRLF inside the dialogues (and a few lone CRs), and CRLF line ends in the file itself.
    _write_lines(crlf / "train.jsonl", [_crlf(r, "\r" if i % 5 == 0 else "\r\n") for i, r in enumerate(train)], "\r\n")
    _write_lines(crlf / "test.jsonl", [_crlf(r) for r in test], "\r\n")
    args = dict(test_offset=4)
    want = data.load_splits(data.DataArguments(dataset_name=str(lf), **args))
    got = data.load_splits(data.DataArguments(dataset_name=str(crlf), **args))
    assert got.drops["train"].dropped == 0 and got.drops["test"].dropped == 0
    assert len(got.train) == 34 and _as_dict(got) == _as_dict(want)


def test_crlf_dahoas_prompt_loads_like_lf():
    row = {
        "prompt": "\r\n\r\nHuman: hi?\r\n\r\nAssistant:",
        "response": " x",
        "chosen": " a\r\nb",
        "rejected": " c",
    }
    lf = {k: v.replace("\r\n", "\n") for k, v in row.items()}
    assert data.normalize_row(row, "dahoas") == data.normalize_row(lf, "dahoas")


# 4. Undecodable lines, damaged files, byte order marks


def test_undecodable_line_is_counted_with_its_location(tmp_path):
    rows = _raw_rows(5)
    lines = [json.dumps(r).encode() for r in rows]
    lines[2] = lines[2].replace(b"Human", b"Hu\xffman", 1)  # one invalid UTF-8 byte
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    read = data.read_rows(str(tmp_path), "train")
    assert len(read) == 5
    ds, report = data.normalize_rows(read, "raw", "train")
    assert len(ds) == 4 and dict(report.counts) == {"undecodable_line": 1}
    assert report.examples["undecodable_line"] == ["train.jsonl:3"]
    assert "train.jsonl:3" in report.summary("train")


def test_byte_order_mark_does_not_cost_row_0(tmp_path):
    rows = _raw_rows(4)
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + "".join(json.dumps(r) + "\n" for r in rows).encode())
    (tmp_path / "b.json").write_bytes(bom + json.dumps(rows, indent=1).encode())
    with gzip.open(tmp_path / "c.json.gz", "wb") as f:
        f.write(bom + json.dumps(rows).encode())
    for name in ("a.jsonl", "b.json", "c.json.gz"):
        assert data.read_rows(str(tmp_path / name), "train") == rows, name
        _, report = data.normalize_rows(data.read_rows(str(tmp_path / name), "train"), "raw", "train")
        assert report.dropped == 0, name


def test_damaged_gzip_names_the_file(tmp_path):
    _write_lines(tmp_path / "good.jsonl.gz", _raw_rows(400))
    blob = (tmp_path / "good.jsonl.gz").read_bytes()
    (tmp_path / "truncated.jsonl.gz").write_bytes(blob[: len(blob) // 2])  # EOFError
    (tmp_path / "corrupt.jsonl.gz").write_bytes(blob[:40] + bytes(b ^ 0x5A for b in blob[40:80]) + blob[80:])
    (tmp_path / "plain.jsonl.gz").write_bytes(b'{"chosen": "x"}\n')  # not gzip at all
    for name in ("truncated.jsonl.gz", "corrupt.jsonl.gz", "plain.jsonl.gz"):
        with pytest.raises(ValueError, match=rf"{name}: the gzip data is damaged.*truncated or corrupt.*again"):
            data.read_rows(str(tmp_path / name), "train")
    with pytest.raises(ValueError, match=r"truncated\.jsonl\.gz: the gzip data is damaged after line [1-9]"):
        data.read_rows(str(tmp_path / "truncated.jsonl.gz"), "train")


def test_truncated_json_array_names_file_line_and_column(tmp_path):
    text = json.dumps(_raw_rows(3), indent=1)
    (tmp_path / "train.json").write_text(text[: len(text) - 30])
    with pytest.raises(ValueError, match=r"train\.json:\d+:\d+: invalid JSON array .*\.jsonl"):
        data.read_rows(str(tmp_path), "train")
    (tmp_path / "train.json").write_bytes(b'[\n{"chosen": "a"},\n{"chosen": "\xff"}]')
    with pytest.raises(ValueError, match=r"train\.json:3: not UTF-8"):
        data.read_rows(str(tmp_path), "train")


# 5. Schema from object rows only


def test_detect_format_reads_object_rows_only(tmp_path):
    raw = _raw_rows(40)
    marker = {data_io.UNPARSABLE: "x.jsonl:1: bad"}
    assert formats.detect([42, None, "prompt", ["prompt"], marker, *raw]) == "raw"
    hh_prompt = {"prompt": "\n\nHuman: p\n\nAssistant:", "chosen": "c", "rejected": "r"}
    assert formats.detect([None, "chosen", hh_prompt]) == "dahoas"
    # A prompt without HH turn markers is TRL's plain-text "standard" format, not Dahoas.
    assert formats.detect([None, "chosen", {"prompt": "p", "chosen": "c", "rejected": "r"}]) == "standard"
    with pytest.raises(ValueError, match="dataset_format=raw"):
        formats.detect([42, None, "prompt"])
    # Through a file: the non-object rows are counted, the rest load as raw.
    _write_lines(tmp_path / "train.jsonl", ["42", "null", '"prompt"', *raw])
    _write_lines(tmp_path / "test.jsonl", _raw_rows(5, seed=9))
    splits = data.load_splits(data.DataArguments(dataset_name=str(tmp_path), test_offset=2))
    assert splits.source["format"] == "raw" and len(splits.train) == 42
    assert dict(splits.drops["train"].counts) == {"not_an_object": 3}
    assert splits.drops["train"].examples["not_an_object"] == ["train[0]", "train[1]", "train[2]"]


# 6. Local paths vs hub ids


def test_missing_relative_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert data_io.is_hub_id("Dahoas/full-hh-rlhf") and data_io.is_hub_id("Anthropic/hh-rlhf")
    for name in ("out/no_such_dir", "./a/b", "a/b.jsonl", "a/b.json.gz", "~/x", "/abs/x", "a/b/c", "name"):
        assert not data_io.is_hub_id(name), name
    with pytest.raises(FileNotFoundError) as err:
        data.read_rows("out/no_such_dir", "train")
    assert "dataset_name='out/no_such_dir'" in str(err.value)
    assert str(tmp_path / "out" / "no_such_dir") in str(err.value) and "local folder" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"dataset_name='data/train\.jsonl'.*no such file"):
        data.load_splits(data.DataArguments(dataset_name="data/train.jsonl", test_offset=0))


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_id_while_offline_fails_at_once(tmp_path, monkeypatch, var):
    monkeypatch.chdir(tmp_path)
    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, "1")
    with pytest.raises(ConnectionError, match=rf"dataset_name='hhrm-nobody/no-such-set'.*offline \({var}=1\)"):
        data.load_splits(data.DataArguments(dataset_name="hhrm-nobody/no-such-set", test_offset=0))


def test_missing_path_shaped_like_a_hub_id_is_refused_at_once_where_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    import socket
    import time

    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)  # no out/ here: out/no_such_dir has the owner/name shape of a hub id
    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    with socket.socket() as probe:  # a port where nothing listens: the hub is unreachable, as on a machine offline
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    start = time.perf_counter()
    with pytest.raises(ConnectionError) as err:
        data.load_splits(data.DataArguments(dataset_name="out/no_such_dir", test_offset=0))
    assert time.perf_counter() - start < 10  # no retries
    missing = tmp_path.resolve() / "out" / "no_such_dir"
    assert str(err.value).startswith(
        f"dataset_name='out/no_such_dir': no such local file or folder ({missing}), and not a reachable hub id: "
        f"the hub ({endpoint}) cannot be reached"
    )
