"""The reward-source seam (hhrm.reward.sources): every source gives the rewards of the reference code its convention
names, the settings are refused in one line, and RAFT scores a reward model of another tool's convention exactly as
that tool does."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from test_conventions import (
    CHAT_TEMPLATE,
    PROMPTS,
    RESPONSES,
    _card_pipeline,
    _deberta_rm,
    _decoder_tokenizer,
    _llama_rm,
    _wordpiece_tokenizer,
)
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hhrm.reward import conventions, sources
from hhrm.reward.scoring import RewardScorer

from conftest import QUICK_TEST_OFFSET, load_recipe


@pytest.fixture(scope="module")
def card_rm(tmp_path_factory) -> Path:
    """A Llama RM folder shaped like the seed card's published one: pad == EOS, no convention recorded."""
    folder = tmp_path_factory.mktemp("card_rm") / "rm"
    tok = _decoder_tokenizer(pad_is_eos=True)
    _llama_rm(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    assert conventions.recorded(folder) is None
    return folder


def _reference(folder: Path, texts: list[str]) -> list[float]:
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    return _card_pipeline(model, AutoTokenizer.from_pretrained(folder), texts)


# --------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize(
    "settings, message",
    [
        ({}, "reward_model_name_or_path is not set"),
        ({"reward_model_name_or_path": "a", "reward_model_url": "http://x"}, "both set: give one"),
        ({"reward_model_url": "http://x", "reward_api": "vllm-classify"}, "reward_api=vllm-classify: set"),
        (
            {"reward_model_url": "http://x", "reward_api": "openrlhf", "reward_convention": "hhrm"},
            "its own convention",
        ),
        ({"reward_model_url": "http://x", "reward_convention": "hhrm"}, "started with"),
        ({"reward_model_name_or_path": "a", "reward_api": "grpc"}, "reward_api='grpc'"),
        ({"reward_model_name_or_path": "a", "reward_convention": "pipeline"}, "reward_convention='pipeline'"),
        ({"reward_model_name_or_path": "a", "reward_batch_size": 0}, "reward_batch_size=0"),
    ],
)
def test_settings_that_cannot_make_a_source_are_refused_in_one_line(settings, message):
    with pytest.raises(ValueError, match=message) as refused:
        sources.RewardArguments(**settings).check_reward_source()
    assert "\n" not in str(refused.value)


def test_a_pad_is_eos_folder_needs_its_convention_named_and_then_scores_as_the_card_does(card_rm):
    with pytest.raises(ValueError, match="set reward_convention to one of .*card-pipeline"):
        sources.build(sources.RewardArguments(reward_model_name_or_path=str(card_rm)))
    args = sources.RewardArguments(reward_model_name_or_path=str(card_rm), reward_convention="card-pipeline")
    source = sources.build(args, device="cpu", dtype=torch.float32)
    assert not source.resident  # checked, not loaded
    texts = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    assert source.score_pairs(PROMPTS, RESPONSES) == pytest.approx(_reference(card_rm, texts), abs=1e-5)
    assert source.identity()["convention"] == "card-pipeline" and source.identity()["weights"]
    source.release()
    assert not source.resident


# --------------------------------------------------------------------------------------------
# Servers: hhrm's (POST /score), OpenRLHF's protocol (POST /get_reward) and a vLLM classifier (POST /classify)


@pytest.mark.slow
def test_hhrm_and_openrlhf_servers_give_the_folders_rewards(card_rm, tmp_path):
    from bench.servers import launch

    texts = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    expected = _reference(card_rm, texts)
    with launch(card_rm, "--reward_convention", "card-pipeline", "--num_threads", "1", log=tmp_path / "log") as url:
        hhrm = sources.build(sources.RewardArguments(reward_model_url=url, reward_batch_size=3))
        assert hhrm.score_pairs(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)
        assert hhrm.identity()["convention"] == "card-pipeline"
        openrlhf = sources.build(sources.RewardArguments(reward_model_url=url, reward_api="openrlhf"))
        assert openrlhf.score_pairs(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)


class _VLLMClassify(BaseHTTPRequestHandler):
    """What vLLM's ``POST /classify`` computes for a one-label classifier: each input's ids through the model alone,
    the logit at its true last token (vLLM's last-token pooling), raw with ``use_activation: false``."""

    model = None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/classify" and body["use_activation"] is False
        data = []
        with torch.no_grad():
            for i, ids in enumerate(body["input"]):
                hidden = self.model.model(input_ids=torch.tensor([ids])).last_hidden_state
                data.append({"index": i, "probs": [float(self.model.score(hidden)[0, -1, 0])], "num_classes": 1})
        answer = json.dumps({"data": data}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def test_a_vllm_classifier_gives_the_verl_conventions_rewards(card_rm):
    """reward_api=vllm-classify with the served folder: the ids are built by verl's convention here, vLLM reads the
    true last token; the rewards equal RewardScorer's under verl-vllm (proven against verl's code in
    tests/test_conventions.py)."""
    tok = AutoTokenizer.from_pretrained(card_rm)
    tok.chat_template = None  # the card RM has no template: verl's rule on a concat text
    folder = card_rm.parent / "served"
    shutil.copytree(card_rm, folder, dirs_exist_ok=True)
    _VLLMClassify.model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _VLLMClassify)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        args = sources.RewardArguments(
            reward_model_url=url, reward_model_name_or_path=str(folder), reward_api="vllm-classify",
            reward_convention="openrlhf", reward_batch_size=2,
        )  # fmt: skip
        got = sources.build(args).score_pairs(PROMPTS, RESPONSES)
    finally:
        server.shutdown()
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    expected = RewardScorer(model, tok, convention=conventions.PRESETS["openrlhf"]).score_pairs(PROMPTS, RESPONSES)
    assert got == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------------------------
# RAFT through the seam


@pytest.mark.slow
def test_raft_scores_a_card_style_reward_model_as_the_cards_snippet_does(quick_models, tmp_path):
    """The seed card's RM shape (pad == EOS, nothing recorded) in RAFT: refused before any generation until
    reward_convention is named; then every sample's reward is the card snippet's reward of its text."""
    from trl import ModelConfig, TrlParser

    from hhrm import data as hdata
    from hhrm.raft import RaftConfig, StopRequested

    folder = tmp_path / "card_style_rm"
    shutil.copytree(quick_models["rm"], folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop(conventions.CONFIG_KEY, None)
    (folder / "config.json").write_text(json.dumps(config | {"pad_token_id": tok.eos_token_id}))

    def run(**extra):
        values = dict(
            model_name_or_path=quick_models["policy"], reward_model_name_or_path=folder,
            dataset_name=quick_models["data"], output_dir=tmp_path / "raft", num_iterations=1,
            prompts_per_iteration=6, num_samples=2, max_new_tokens=8, heldout_prompts=2, generation_batch_size=8,
            test_offset=QUICK_TEST_OFFSET, seed=0, progress=False, disable_tqdm=True, stop_after="0:score", **extra,
        )  # fmt: skip
        argv = [x for k, v in values.items() for x in (f"--{k}", str(v))]
        configs = TrlParser((hdata.DataArguments, RaftConfig, ModelConfig)).parse_args_and_config(argv)
        return load_recipe("raft").main(*configs)

    with pytest.raises(ValueError, match="reward_convention"):
        run()
    assert not (tmp_path / "raft" / "iter_000" / "samples.jsonl").exists()  # refused before generating
    with pytest.raises(StopRequested):
        run(reward_convention="card-pipeline")
    rows = [json.loads(line) for line in (tmp_path / "raft" / "iter_000" / "scored.jsonl").read_text().splitlines()]
    texts = [r["prompt"] + response for r in rows for response in r["responses"]]
    assert len(texts) == 12
    assert [x for r in rows for x in r["rewards"]] == pytest.approx(_reference(folder, texts), abs=1e-5)


# --------------------------------------------------------------------------------------------
# Every kind of folder through make score, the server and RAFT


def _folder_of_kind(kind: str, root: Path) -> tuple[Path, str | None]:
    """A reward-model folder of each kind the issue names, and the reward_convention a user states for it (None:
    recorded in the folder)."""
    folder = root / kind
    if kind == "encoder-pair":
        tok = _wordpiece_tokenizer()
        _deberta_rm(tok).save_pretrained(folder)
        tok.save_pretrained(folder)
        return folder, "encoder-pair"
    tok = _decoder_tokenizer(pad_is_eos=kind != "hhrm")
    if kind == "verl-vllm":
        tok.chat_template = CHAT_TEMPLATE
    model = _llama_rm(tok)
    if kind in ("hhrm", "trl-grpo"):  # recorded in config.json: detected, not stated
        setattr(model.config, conventions.CONFIG_KEY, kind)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, None if kind in ("hhrm", "trl-grpo") else kind


def _expected(folder: Path, kind: str, prompts: list[str], responses: list[str]) -> list[float]:
    """RewardScorer under the preset on the in-memory model: proven equal to the preset's reference code in
    tests/test_conventions.py."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    return RewardScorer(model, tok, convention=conventions.PRESETS[kind]).score_pairs(prompts, responses)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hhrm", "card-pipeline", "trl-grpo", "verl-vllm", "encoder-pair"])
def test_each_kind_of_folder_scores_alike_in_make_score_the_server_and_raft(kind, quick_models, tmp_path):
    from trl import ModelConfig, TrlParser

    from hhrm import data as hdata
    from hhrm.raft import RaftConfig, StopRequested
    from hhrm.reward import score_file

    from bench.servers import launch

    folder, stated = _folder_of_kind(kind, tmp_path)
    given = [] if stated is None else ["--reward_convention", stated]
    expected = _expected(folder, kind, PROMPTS, RESPONSES)
    # make score: prompt/response rows in, each row's reward out
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(PROMPTS, RESPONSES)))
    parser = TrlParser((score_file.ScoreDataArguments, score_file.ScoreConfig))
    data_args, args = parser.parse_args_and_config(
        ["--dataset_name", str(rows), "--output_file", str(tmp_path / "scores.jsonl"), "--progress", "false", *given]
    )
    score_file.run(data_args, args, str(folder))
    scored = [json.loads(x)["reward"] for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert scored == pytest.approx(expected, abs=1e-5)
    # make serve-rm, and a client through the seam
    with launch(folder, *given, "--num_threads", "1", log=tmp_path / "server.log") as url:
        served = sources.build(sources.RewardArguments(reward_model_url=url)).score_pairs(PROMPTS, RESPONSES)
    assert served == pytest.approx(expected, abs=1e-5)
    # RAFT's score stage: the rewards of the samples it generated
    values = dict(
        model_name_or_path=quick_models["policy"], reward_model_name_or_path=folder, dataset_name=quick_models["data"],
        output_dir=tmp_path / "raft", num_iterations=1, prompts_per_iteration=4, num_samples=2, max_new_tokens=8,
        heldout_prompts=2, test_offset=QUICK_TEST_OFFSET, seed=0, progress=False, disable_tqdm=True,
        stop_after="0:score", **({} if stated is None else {"reward_convention": stated}),
    )  # fmt: skip
    argv = [x for k, v in values.items() for x in (f"--{k}", str(v))]
    with pytest.raises(StopRequested):
        load_recipe("raft").main(
            *TrlParser((hdata.DataArguments, RaftConfig, ModelConfig)).parse_args_and_config(argv)
        )
    done = [json.loads(x) for x in (tmp_path / "raft" / "iter_000" / "scored.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in done for _ in r["responses"]]
    responses = [x for r in done for x in r["responses"]]
    assert [x for r in done for x in r["rewards"]] == pytest.approx(
        _expected(folder, kind, prompts, responses), abs=1e-5
    )
