"""The card's chains end to end on tiny stand-ins of its model families (:mod:`hhrm.standins`), driven by the card
recipes' own YAML files with only model paths, data path, sizes and precision overridden:

- open_llama_3b SFT -> RM (open_llama_3b/{sft,rm}.yaml);
- GPT-Neo RAFT scored by that RM (gpt_neo_2.7b/{raft,raft_dpo}.yaml): two tokenizers in one loop;
- LLaMA-7B SFT -> RAFT (llama_7b/{sft,raft}.yaml).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hhrm.reporting import read_jsonl

from conftest import load_recipe

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
TEST_OFFSET = 100
PRECISION = dict(dtype="float32", bf16="false")  # the card's bf16 is issue 18's accelerate-config runs, not these
# RAFT sizes: 2 iterations of 8 prompts x the card's K=8, short responses.
RAFT_SIZES = dict(num_iterations=2, prompts_per_iteration=8, max_new_tokens=16, heldout_prompts=8)


def run_recipe(stage: str, config: str, **overrides):
    """``recipes/<stage>.py --config recipes/configs/<config> --k v ...`` in this process; returns
    ``(metrics, (data_args, args, model_args))``, the configs as the recipe received them."""
    from trl import ModelConfig, TrlParser

    from hhrm import data, sft
    from hhrm.raft import RaftConfig
    from hhrm.rm import stage as rm

    stage_config = {"sft": sft.SFTConfig, "rm": rm.RewardConfig, "raft": RaftConfig}[stage]
    values = PRECISION | overrides
    argv = ["--config", str(CONFIGS / config), *(x for k, v in values.items() for x in (f"--{k}", str(v)))]
    configs = TrlParser((data.DataArguments, stage_config, ModelConfig)).parse_args_and_config(argv)
    return load_recipe(stage).main(*configs), configs


@pytest.fixture(scope="module")
def standins(tiny, tmp_path_factory) -> dict[str, Path]:
    from hhrm.standins import ensure_standins

    return ensure_standins(tmp_path_factory.mktemp("standins"), tiny["data"])


def sft_overrides(model: Path, data: Path, out: Path) -> dict:
    return dict(
        model_name_or_path=model, dataset_name=data, test_offset=TEST_OFFSET, output_dir=out, max_steps=2, eval_rows=32
    )


@pytest.fixture(scope="module")
def open_llama(standins, tiny, tmp_path_factory) -> dict:
    """open_llama_3b/sft.yaml then open_llama_3b/rm.yaml on the open_llama stand-in."""
    out = tmp_path_factory.mktemp("open_llama")
    sft_metrics, sft_configs = run_recipe(
        "sft", "open_llama_3b/sft.yaml", **sft_overrides(standins["open_llama"], tiny["data"], out / "sft")
    )
    rm_metrics, rm_configs = run_recipe(
        "rm",
        "open_llama_3b/rm.yaml",
        model_name_or_path=out / "sft",
        dataset_name=tiny["data"],
        test_offset=TEST_OFFSET,
        output_dir=out / "rm",
        max_steps=3,
    )
    return dict(sft=out / "sft", rm=out / "rm", sft_run=(sft_metrics, sft_configs), rm_run=(rm_metrics, rm_configs))


def raft_overrides(policy: Path, rm: Path, data: Path, out: Path, **more) -> dict:
    return (
        dict(
            model_name_or_path=policy,
            reward_model_name_or_path=rm,
            dataset_name=data,
            test_offset=TEST_OFFSET,
            output_dir=out,
            **RAFT_SIZES,
        )
        | more
    )


@pytest.fixture(scope="module")
def neo_raft(standins, open_llama, tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("neo_raft")
    run_recipe(
        "raft", "gpt_neo_2.7b/raft.yaml", **raft_overrides(standins["gpt_neo"], open_llama["rm"], tiny["data"], out)
    )
    return out


def test_open_llama_sft_then_rm_on_the_card_configs(standins, open_llama):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    _, (_, sft_args, _) = open_llama["sft_run"]
    assert sft_args.packing and sft_args.max_length == 1024 and sft_args.learning_rate == 2e-5  # the card's YAML
    assert sft_args.activation_checkpointing and not sft_args.bf16
    base_tok = AutoTokenizer.from_pretrained(standins["open_llama"])
    assert base_tok.pad_token is None  # as open_llama ships
    # No pad token: hhrm pads with <unk> (distinct from EOS </s>), so nothing is added and nothing resized.
    for folder in (open_llama["sft"], open_llama["rm"]):
        tok = AutoTokenizer.from_pretrained(folder)
        assert (tok.pad_token, tok.pad_token_id, tok.eos_token_id, len(tok)) == ("<unk>", 0, 2, len(base_tok))
        assert tok("Human: hi")["input_ids"][0] == tok.bos_token_id  # BOS still prepended
    sft_model = AutoModelForCausalLM.from_pretrained(open_llama["sft"])
    assert sft_model.get_input_embeddings().weight.shape[0] == len(base_tok) == sft_model.config.vocab_size
    assert sft_model.config.pad_token_id == sft_model.generation_config.pad_token_id == 0
    sft_metrics, _ = open_llama["sft_run"]
    assert "eval_loss" in sft_metrics and "eval_loss_before" in sft_metrics

    rm_metrics, (_, rm_args, _) = open_llama["rm_run"]
    assert rm_args.global_batch_size == 32 and rm_args.max_length == 512 and rm_args.learning_rate == 5e-6
    assert rm_args.gradient_accumulation_steps == 8  # 32 pairs / (4 per device x 1 process)
    assert 0.0 <= rm_metrics["eval_accuracy_exact"] <= 1.0 and rm_metrics["pairs_dropped_long"] == 0
    rm = AutoModelForSequenceClassification.from_pretrained(open_llama["rm"])
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == 0
    assert json.loads((open_llama["rm"] / "config.json").read_text())["reward_convention"] == "hhrm"


def rm_reference_score(model, tok, text: str) -> float:
    """The RM's own scoring of one text, unbatched: ``tokenizer(text + eos)`` (BOS prepended), the head's logit."""
    ids = tok(text + tok.eos_token, return_tensors="pt")
    with torch.no_grad():
        return float(model(**ids).logits[0, 0])


def test_gpt_neo_raft_rewards_are_the_llama_rms_scores_of_the_decoded_text(neo_raft, open_llama):
    """Policy (GPT-2 BPE, no BOS) and RM (LLaMA tokenizer, BOS) tokenize differently: each reward is the RM's score
    of the decoded prompt + response, re-tokenized by the RM's tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hhrm.reward import conventions
    from hhrm.reward.scoring import RewardScorer

    rm_path = open_llama["rm"]
    scorer = RewardScorer.from_pretrained(rm_path, "cpu", torch.float32, convention=conventions.recorded(rm_path))
    model = AutoModelForSequenceClassification.from_pretrained(rm_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(rm_path)
    for it in (0, 1):
        scored = read_jsonl(neo_raft / f"iter_{it:03d}" / "scored.jsonl")
        assert len(scored) == 8 and all(len(r["responses"]) == len(r["rewards"]) == 8 for r in scored)
        prompts = [r["prompt"] for r in scored for _ in r["responses"]]
        responses = [x for r in scored for x in r["responses"]]
        rewards = [x for r in scored for x in r["rewards"]]
        assert scorer.score_pairs(prompts, responses) == pytest.approx(rewards, abs=1e-5)
        for p, x, reward in list(zip(prompts, responses, rewards))[::7]:
            assert rm_reference_score(model, tok, p + x) == pytest.approx(reward, abs=1e-5)
    rows = json.loads((neo_raft / "metrics_per_iteration.json").read_text())
    assert [r["iteration"] for r in rows["iterations"]] == [0, 1]
    assert "heldout_reward" in rows["iterations"][0] and "heldout_reward" in rows["final"]
    held = read_jsonl(neo_raft / "iter_000" / "heldout_scored.jsonl")
    assert len(held) == 8
    head = json.loads((neo_raft / "metrics.json").read_text())
    assert "reward_first_sample_last" in head


def test_gpt_neo_without_a_pad_token_gets_one_added_and_saved_everywhere(standins, neo_raft):
    """GPT-Neo's tokenizer has no pad and its UNK is its EOS: hhrm adds ``<pad>`` (one new id), resizes the tied
    embeddings, and saves tokenizer, embeddings, config and generation_config agreeing, so the saved policy loads
    and generates as is. A vLLM server started from the *original* checkpoint has one row fewer (see README)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base_tok = AutoTokenizer.from_pretrained(standins["gpt_neo"])
    assert base_tok.pad_token is None and base_tok.unk_token == base_tok.eos_token == base_tok.bos_token
    base_rows = AutoModelForCausalLM.from_pretrained(standins["gpt_neo"]).get_input_embeddings().weight.shape[0]
    assert base_rows == len(base_tok)
    for folder in (neo_raft / "iter_000" / "policy", neo_raft / "iter_001" / "policy", neo_raft):
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.pad_token == "<pad>" and tok.pad_token_id == len(base_tok) and len(tok) == len(base_tok) + 1
        assert tok.eos_token_id == base_tok.eos_token_id
        with safe_open(folder / "model.safetensors", "pt") as f:
            rows = {k: f.get_slice(k).get_shape()[0] for k in f.keys() if "wte" in k or "lm_head" in k}
        assert rows and set(rows.values()) == {len(tok)}, rows  # every vocabulary-sized tensor saved resized
        config = json.loads((folder / "config.json").read_text())
        assert config["vocab_size"] == len(tok) and config["pad_token_id"] == tok.pad_token_id
        assert GenerationConfig.from_pretrained(folder).pad_token_id == tok.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(neo_raft)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied


def test_gpt_neo_raft_resumes_after_a_stop_with_the_same_kept_set(standins, open_llama, neo_raft, tiny, tmp_path):
    from hhrm.raft import StopRequested

    values = raft_overrides(standins["gpt_neo"], open_llama["rm"], tiny["data"], tmp_path / "resumed")
    for stop in ("0:score", "1:generate"):
        with pytest.raises(StopRequested):
            run_recipe("raft", "gpt_neo_2.7b/raft.yaml", **values, stop_after=stop)
    run_recipe("raft", "gpt_neo_2.7b/raft.yaml", **values)
    for it in (0, 1):
        name = f"iter_{it:03d}"
        assert read_jsonl(tmp_path / "resumed" / name / "kept.jsonl") == read_jsonl(neo_raft / name / "kept.jsonl")
    a = json.loads((neo_raft / "metrics_per_iteration.json").read_text())["final"]
    b = json.loads((tmp_path / "resumed" / "metrics_per_iteration.json").read_text())["final"]
    assert a["heldout_reward"] == b["heldout_reward"]


def test_gpt_neo_dpo_update_runs_one_iteration(standins, open_llama, tiny, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "dpo"
    _, (_, args, _) = run_recipe(
        "raft",
        "gpt_neo_2.7b/raft_dpo.yaml",
        **raft_overrides(standins["gpt_neo"], open_llama["rm"], tiny["data"], out, num_iterations=1),
    )
    assert args.update == "dpo" and args.learning_rate == 5e-7 and args.gradient_accumulation_steps == 8
    d = out / "iter_000"
    pairs = read_jsonl(d / "kept.jsonl")
    stats = json.loads((d / "select.stats.json").read_text())
    assert pairs and len(pairs) + sum(stats["skipped"].values()) == 8
    assert all(p["reward"] > p["rejected_reward"] for p in pairs)
    train = json.loads((d / "train.stats.json").read_text())
    assert 0.0 <= train["dpo_reward_accuracy"] <= 1.0
    start = load_file(standins["gpt_neo"] / "model.safetensors")
    trained = load_file(d / "policy" / "model.safetensors")
    key = "transformer.h.0.attn.attention.q_proj.weight"
    assert not torch.equal(start[key], trained[key])  # lr 5e-7 still moves fp32 weights
    assert (out / "model.safetensors").is_file() and "heldout_reward" in json.loads(
        (out / "metrics_per_iteration.json").read_text()
    )["final"]


def test_llama_sft_then_raft_on_the_card_configs(standins, open_llama, tiny, tmp_path):
    """llama_7b/sft.yaml, then llama_7b/raft.yaml from its output, scored by the open_llama RM (another vocabulary)."""
    from transformers import AutoTokenizer

    sft_metrics, (_, sft_args, _) = run_recipe(
        "sft", "llama_7b/sft.yaml", **sft_overrides(standins["llama"], tiny["data"], tmp_path / "sft")
    )
    assert sft_args.num_train_epochs == 1 and sft_args.packing and sft_args.eval_strategy == "no"
    assert "train_loss" in sft_metrics
    out = tmp_path / "raft"
    _, (_, args, _) = run_recipe(
        "raft",
        "llama_7b/raft.yaml",
        **raft_overrides(tmp_path / "sft", open_llama["rm"], tiny["data"], out, num_iterations=1),
    )
    assert args.generation_batch_size == 8 and args.per_device_train_batch_size == 2
    policy_tok, rm_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(open_llama["rm"])
    assert len(policy_tok) == len(AutoTokenizer.from_pretrained(standins["llama"])) != len(rm_tok)  # nothing added
    assert policy_tok.pad_token == "<unk>"
    scored = read_jsonl(out / "iter_000" / "scored.jsonl")
    assert len(scored) == 8 and all(len(r["rewards"]) == 8 for r in scored)
    rows = json.loads((out / "metrics_per_iteration.json").read_text())
    assert "heldout_reward" in rows["final"] and (out / "iter_000" / "kept.jsonl").is_file()


def test_a_llama_policy_generates_after_bos_and_keeps_the_responses_leading_space(standins):
    """LLaMA's tokenizer prepends BOS (TRL fine-tunes the policy with it) and its decode drops the leading space of a
    text decoded alone: generation starts from BOS + prompt; a response is cut from the decoded prompt + response."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hhrm import generation

    tok = AutoTokenizer.from_pretrained(standins["llama"])
    tok.pad_token = tok.unk_token
    model = AutoModelForCausalLM.from_pretrained(standins["llama"]).eval()
    prompt = "###Human: How many words are in this list: piano castle? ###Assistant:"
    greedy = generation.SamplingArguments(max_new_tokens=6, do_sample=False, stop_at_turn_marker=False)
    (got,) = generation.generate_responses(model, tok, [prompt], 1, greedy)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id
    new = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1] :]
    whole = tok.decode(ids[0].tolist() + new.tolist(), skip_special_tokens=True)
    assert got == [whole[len(prompt) :]]
    space = [t for t in range(3, len(tok)) if tok.convert_ids_to_tokens(t).startswith("▁")][0]
    (text,) = generation.decode_completions(tok, [tok(prompt)["input_ids"]], [[space]])
    assert text.startswith(" ") and tok.decode([space]) == text.strip()  # decoded alone, the space is lost


def test_vllm_generation_of_a_gpt_neo_policy_is_refused_at_the_start(standins):
    """vLLM cannot run GPT-Neo; and a vLLM server holds the checkpoint's rows, so a tokenizer grown by a pad token
    (GPT-Neo's, after hhrm adds one) cannot be pushed to it: both refused in one line before anything loads."""
    from types import SimpleNamespace

    from trl import ModelConfig

    from hhrm import modeling
    from hhrm.raft.models import check_vllm_policy

    neo = ModelConfig(model_name_or_path=str(standins["gpt_neo"]))
    tokenizer = modeling.load_tokenizer(neo)
    with pytest.raises(ValueError, match="vLLM cannot run GPT-Neo.*generation_backend=hf"):
        check_vllm_policy(SimpleNamespace(generation_backend="vllm", vllm_mode="colocate"), neo, tokenizer)
    llama = ModelConfig(model_name_or_path=str(standins["llama"]))
    grown = modeling.load_tokenizer(llama)
    grown.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    with pytest.raises(ValueError, match="start the vLLM server from a folder saved with the resized vocabulary"):
        check_vllm_policy(SimpleNamespace(generation_backend="vllm", vllm_mode="server"), llama, grown)
    check_vllm_policy(SimpleNamespace(generation_backend="hf", vllm_mode="colocate"), neo, tokenizer)  # hf: fine
