"""The one generation path: batching with left padding, cutting by token position, seeds."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hhrm import formatting
from hhrm.generation import SamplingArguments, generate_responses
from hhrm.reporting import read_jsonl

PROMPTS = [
    "###Human: What is 3 plus 4? ###Assistant:",
    "###Human: Hi there! ###Assistant: Hello! How can I help you today? "
    "###Human: Which number is larger, 12 or 40? ###Assistant:",
    "###Human: How many words are in this list: apple river? ###Assistant:",
]


@pytest.fixture(scope="module")
def base(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny["base"]).eval()
    return model, tok


def test_batched_left_padded_equals_one_by_one(base):
    """Greedy answers from one padded batch equal unpadded single-prompt answers, cut after the prompt's tokens."""
    model, tok = base
    greedy = SamplingArguments(max_new_tokens=12, do_sample=False, stop_at_turn_marker=False)
    batched = generate_responses(model, tok, PROMPTS, 1, greedy, batch_size=8)
    for prompt, got in zip(PROMPTS, batched):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        assert got == [tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)]
        assert not got[0].startswith(prompt)


def test_k_samples_shape_seed_and_token_stats(base):
    model, tok = base
    sampling = SamplingArguments(max_new_tokens=8)
    stats: dict = {}
    a = generate_responses(model, tok, PROMPTS, 3, sampling, batch_size=2, seed=7, stats=stats)
    b = generate_responses(model, tok, PROMPTS, 3, sampling, batch_size=2, seed=7)
    assert [len(r) for r in a] == [3, 3, 3]
    assert a == b  # same seed, same inputs: same samples (what a resumed RAFT stage relies on)
    assert 0 < stats["generated_tokens"] <= 3 * 3 * 8 and stats["seconds"] > 0


def test_responses_are_cut_at_the_next_turn(base):
    model, tok = base
    out = generate_responses(model, tok, PROMPTS, 4, SamplingArguments(max_new_tokens=16), seed=0)
    for row in out:
        for text in row:
            assert formatting.HUMAN not in text and formatting.ASSISTANT not in text
            assert text == formatting.cut_at_next_turn(text)


def test_bad_settings_fail_early(base):
    model, tok = base
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_responses(model, tok, PROMPTS, 1, SamplingArguments(max_new_tokens=0))
    with pytest.raises(ValueError, match="temperature"):
        generate_responses(model, tok, PROMPTS, 1, SamplingArguments(temperature=0.0))
    with pytest.raises(ValueError, match="top_p"):
        SamplingArguments(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingArguments(top_k=-1)
    with pytest.raises(ValueError, match="k="):
        generate_responses(model, tok, PROMPTS, 0)


def test_generation_shared_prefill_matches_plain_generate(tiny):
    """hhrm's fast generation path (static cache, prefill once per prompt, cache repeated K times) gives
    the same tokens as plain ``generate(num_return_sequences=K)``: checked with top_k=1 sampling."""
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny["base"]).eval()
    prompts = [
        "###Human: What is 3 plus 4? ###Assistant:",
        "###Human: Hi! ###Assistant: Hello! ###Human: Which number is larger, 12 or 40? ###Assistant:",
    ]
    sampling = SamplingArguments(max_new_tokens=10, top_k=1, stop_at_turn_marker=False)
    got = generate_responses(model, tok, prompts, 3, sampling, batch_size=2)
    for prompt, row in zip(prompts, got):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ref = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=sampling.generation_config(tok, 3)
        )
        assert row == tok.batch_decode(ref[:, ids.shape[1] :], skip_special_tokens=True)


# --------------------------------------------------------------------------------------------
# generation_backend=vllm. vLLM needs CUDA GPUs and is not installed here, so nothing below runs vLLM: the
# settings checks run as they are, and TRL's own VLLMGeneration (server mode) runs against FakeVLLMClient, a
# stand-in for TRL's VLLMClient (HTTP + NCCL to a `trl vllm-serve` process). A fake is used only because vLLM
# cannot run on this machine; it records what TRL would send to the server.


class FakeVLLMClient:
    """TRL's ``VLLMClient`` as ``VLLMGeneration`` calls it: records connections, weight pushes and requests."""

    log: list = []  # (event, details), across instances: one RAFT run builds one client, a resumed run another
    tokenizer = None
    reply = " Seven. ###Human: and you?"

    def __init__(self, base_url=None, host="0.0.0.0", server_port=8000, group_port=51216, connection_timeout=0.0):
        self.log.append(("connect", {"base_url": base_url, "group_port": group_port, "timeout": connection_timeout}))

    def init_communicator(self, device=0):
        self.log.append(("init_communicator", str(device)))

    def update_named_params(self, metadata, named_params):
        pushed = {name: tensor.detach().clone() for name, tensor in named_params}
        assert [m[0] for m in metadata] == list(pushed)  # announced, then streamed in the same order
        self.log.append(("push", pushed))

    def reset_prefix_cache(self):
        self.log.append(("reset_prefix_cache", None))

    def generate(self, prompts, features=None, n=1, **sampling):
        self.log.append(("generate", {"prompts": prompts, "n": n, **sampling}))
        reply = self.tokenizer(self.reply, add_special_tokens=False)["input_ids"]
        return {
            "prompt_ids": prompts,
            "completion_ids": [reply for _ in prompts for _ in range(n)],
            "logprobs": None,
            "logprob_token_ids": None,
        }

    @classmethod
    def events(cls, name: str) -> list:
        return [details for event, details in cls.log if event == name]


@pytest.fixture
def fake_vllm(monkeypatch, base):
    """TRL's server mode with :class:`FakeVLLMClient` in place of the server; hhrm's install check says yes."""
    from trl.generation import vllm_generation

    from hhrm import generation

    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vllm_generation, "VLLMClient", FakeVLLMClient)
    monkeypatch.setattr(generation, "vllm_missing", lambda mode: None)
    monkeypatch.setattr(FakeVLLMClient, "log", [])
    monkeypatch.setattr(FakeVLLMClient, "tokenizer", base[1])
    return FakeVLLMClient


def server_backend(tok, sampling):
    from hhrm.generation import VLLMBackend

    where = dict(server_host="127.0.0.1", server_port=8123, server_timeout=5.0, group_port=51999)
    return VLLMBackend(None, tok, None, sampling, mode="server", **where)


def test_vllm_settings_are_refused_when_read(tmp_path):
    """Each refusal names the setting, at config time (RaftRunner builds nothing before it)."""
    from hhrm.generation import vllm_missing
    from hhrm.raft import RaftConfig

    def config(**kw):
        return RaftConfig(output_dir=str(tmp_path), reward_model_name_or_path="rm", **kw)

    with pytest.raises(ValueError, match="vllm_mode=server: no server address; set vllm_server_host"):
        config(generation_backend="vllm", vllm_mode="server")
    with pytest.raises(ValueError, match="vllm_server_base_url='10.0.0.3:8000': not an http"):
        config(generation_backend="vllm", vllm_mode="server", vllm_server_base_url="10.0.0.3:8000")
    with pytest.raises(ValueError, match="vllm_server_port=0"):
        config(generation_backend="vllm", vllm_mode="server", vllm_server_host="h", vllm_server_port=0)
    with pytest.raises(ValueError, match="vllm_server_timeout"):
        config(generation_backend="vllm", vllm_mode="server", vllm_server_host="h", vllm_server_timeout=0)
    with pytest.raises(ValueError, match="apply to generation_backend=vllm"):
        config(vllm_mode="server")  # server settings while generating with hf: silently unused otherwise
    with pytest.raises(ValueError, match="apply to generation_backend=vllm"):
        config(vllm_server_host="10.0.0.3")
    assert config().generation_backend == "hf"
    if vllm_missing("colocate") is not None:  # this machine: no vLLM, no GPU
        for mode in ("colocate", "server"):
            with pytest.raises(ValueError, match=f"generation_backend=vllm \\(vllm_mode={mode}\\): vLLM is not inst"):
                config(generation_backend="vllm", vllm_mode=mode, vllm_server_host="127.0.0.1")


def test_vllm_server_pushes_each_policy_once_and_generates(base, fake_vllm):
    """Through TRL's VLLMGeneration: connect once, push a policy's weights once (again only for another
    policy, and first thing from a new backend, as after a resume), send each prompt once with n=K."""
    model, tok = base
    sampling = SamplingArguments(max_new_tokens=8)
    backend = server_backend(tok, sampling)
    assert fake_vllm.events("connect") == [{"base_url": "http://127.0.0.1:8123", "group_port": 51999, "timeout": 5.0}]
    assert backend.hold("policy0", model) and not backend.hold("policy0", model)
    [pushed] = fake_vllm.events("push")
    assert list(pushed) == [n for n, _ in model.named_parameters()]
    assert all(torch.equal(pushed[n], p) for n, p in model.named_parameters())

    stats: dict = {}
    out = generate_responses(backend, tok, PROMPTS, 3, sampling, stats=stats)
    assert out == [[" Seven."] * 3] * 3  # decoded, then cut at the next turn
    [request] = fake_vllm.events("generate")
    assert request["prompts"] == tok(PROMPTS, add_special_tokens=False)["input_ids"] and request["n"] == 3
    assert request["max_tokens"] == 8 and request["generation_kwargs"] == {"stop": [formatting.HUMAN]}
    assert stats["generated_tokens"] == 9 * len(tok(FakeVLLMClient.reply, add_special_tokens=False)["input_ids"])

    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # a fine-tune later: the next policy
    try:
        assert backend.hold("policy1", model)
        assert torch.equal(fake_vllm.events("push")[-1]["lm_head.weight"], model.lm_head.weight)
        resumed = server_backend(tok, sampling)  # a new process resuming at policy1 pushes it before generating
        assert resumed.hold("policy1", model) and len(fake_vllm.events("push")) == 3
    finally:
        with torch.no_grad():
            model.lm_head.weight.sub_(1.0)
    with pytest.raises(ValueError, match="other sampling settings"):
        generate_responses(backend, tok, PROMPTS, 1, SamplingArguments(max_new_tokens=8, do_sample=False))


def test_vllm_server_evens_out_unequal_shards(base, fake_vllm, monkeypatch):
    """TRL slices the gathered completions by ``process_index * len(prompts)``: a process with one prompt fewer
    than another sends a filler, whose completions are dropped."""
    import accelerate.utils

    model, tok = base
    backend = server_backend(tok, SamplingArguments(max_new_tokens=8))
    backend.processes = type("TwoProcesses", (), {"num_processes": 2})()
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda counts: [2, 3])  # the other process has 3
    out = backend.generate(PROMPTS[:2], 2)
    assert len(out) == 2 and all(len(r) == 2 for r in out)
    [request] = fake_vllm.events("generate")
    assert len(request["prompts"]) == 3 and request["prompts"][2] == [tok.eos_token_id]


@pytest.mark.slow
def test_raft_pushes_each_published_policy_before_generating_from_it(tiny, base, fake_vllm, tmp_path):
    """A RAFT run with vllm_mode=server (fake server), stopped after 1:draw and resumed: the server receives
    the start policy, then (resumed run) iter_000/policy before iteration 1 generates, then iter_001/policy
    for the final evaluation; each push holds exactly the published policy's weights, and comes once."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification
    from trl import ModelConfig

    from hhrm import data as hdata
    from hhrm.raft import RaftConfig, RaftRunner, StopRequested

    rm = AutoModelForSequenceClassification.from_pretrained(tiny["base"], num_labels=1)
    rm.config.pad_token_id = base[1].pad_token_id
    rm.save_pretrained(tmp_path / "rm")
    base[1].save_pretrained(tmp_path / "rm")
    settings = dict(
        output_dir=str(tmp_path / "raft"),
        reward_model_name_or_path=str(tmp_path / "rm"),
        generation_backend="vllm",
        vllm_mode="server",
        vllm_server_host="127.0.0.1",
        num_iterations=2,
        prompts_per_iteration=8,
        num_samples=2,
        max_new_tokens=8,
        heldout_prompts=4,
        max_length=128,
        per_device_train_batch_size=4,
        report_to="none",
        progress=False,
        disable_tqdm=True,
        offload_models=False,
        seed=0,
    )
    data_args = hdata.DataArguments(dataset_name=str(tiny["data"]), test_offset=100)
    model_args = ModelConfig(model_name_or_path=str(tiny["base"]))
    with pytest.raises(StopRequested):
        RaftRunner(RaftConfig(**settings, stop_after="1:draw"), data_args, model_args).run()
    runner = RaftRunner(RaftConfig(**settings), data_args, model_args)
    runner.run()
    runner.close()
    out = tmp_path / "raft"
    published = [tiny["base"], out / "iter_000" / "policy", out / "iter_001" / "policy"]
    pushes = fake_vllm.events("push")
    assert len(fake_vllm.events("connect")) == 2 and len(pushes) == len(published)
    for pushed, folder in zip(pushes, published):
        saved = load_file(folder / "model.safetensors")
        assert set(pushed) <= set(saved) | {"lm_head.weight"}
        assert all(torch.equal(t, saved[n]) for n, t in pushed.items() if n in saved), folder
    events = [e for e, _ in fake_vllm.log if e != "reset_prefix_cache"]
    connect, push = ["connect", "init_communicator"], ["push"]
    # it 0: samples + held-out; stop; resumed: it 1's samples + held-out; final held-out
    assert events == connect + push + ["generate"] * 2 + connect + push + ["generate"] * 2 + push + ["generate"]
    samples = read_jsonl(out / "iter_001" / "samples.jsonl")
    assert len(samples) == 8 and all(r["responses"] == [" Seven."] * 2 for r in samples)
