"""The reward-model server (recipes/serve_rm.py on LitServe): both protocols give RewardScorer's rewards whatever the
batching, bad requests are refused alone in one line, a folder that is not a reward model never starts, hostile
bodies are refused fast in bounded memory, only the documented routes answer, and the server never outlives its
supervisor nor a dead model process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hhrm.reward import conventions, protocol, scoring
from hhrm.reward import server as serve_rm
from hhrm.reward.protocol import strip_special

from bench.servers import RECIPE, free_port, launch, request_json
from conftest import ROOT, run_process

MAX_TEXTS = 16
SERVER_ARGS = (
    *("--device", "cpu", "--num_threads", "1", "--log_level", "warning"),
    *("--max_batch_size", "4", "--batch_timeout", "0.25"),  # 8 clients released together fill two batches of 4
    *("--max_texts_per_request", str(MAX_TEXTS), "--max_request_bytes", str(2**20)),
)


def pairs(n: int, offset: int = 0) -> tuple[list[str], list[str]]:
    """``n`` prompt/response pairs of varied lengths (some about 200 tokens)."""
    prompts, responses = [], []
    for i in range(offset, offset + n):
        a, b = i % 17, (3 * i) % 23
        history = " ".join(f"###Human: What is {k} plus {k}? ###Assistant: {2 * k}." for k in range(i % 4 * 6))
        prompts.append(f"{history} ###Human: What is {a} plus {b}? ###Assistant:".lstrip())
        responses.append(f" {a} plus {b} is {a + b}." + " Indeed." * (i % 3))
    return prompts, responses


@pytest.fixture(scope="module")
def rm_folder(tiny, tmp_path_factory):
    """A tiny reward model folder: the tiny Llama with a one-label score head (a random, non-trivial head)."""
    folder = tmp_path_factory.mktemp("serve_rm") / "rm"
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny["base"], num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scorer(rm_folder):
    return scoring.RewardScorer.from_pretrained(rm_folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def server(rm_folder, tmp_path_factory):
    """The server as a subprocess on a free loopback port, ready within 10 minutes, always stopped afterwards."""
    log = tmp_path_factory.mktemp("serve_rm_log") / "server.log"
    with launch(rm_folder, *SERVER_ARGS, ready_timeout=600, log=log) as url:
        yield url


@pytest.fixture(scope="module")
def pad_is_eos_folder(rm_folder, tmp_path_factory):
    """The same reward model with its pad token set to its EOS, no convention recorded (the seed card's RM's shape)."""
    folder = tmp_path_factory.mktemp("serve_rm_pad_is_eos") / "rm"
    tok = AutoTokenizer.from_pretrained(rm_folder)
    tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(rm_folder)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def card_server(pad_is_eos_folder, tmp_path_factory):
    """A second server: the pad == EOS folder under reward_convention=card-pipeline (the text as given, no EOS)."""
    log = tmp_path_factory.mktemp("serve_rm_card_log") / "server.log"
    args = (*SERVER_ARGS, "--reward_convention", "card-pipeline")
    with launch(pad_is_eos_folder, *args, ready_timeout=600, log=log) as url:
        yield url


def post(url: str, payload, timeout: float = 120):
    return request_json(url, payload, timeout=timeout)


def check_rewards(got, expected) -> None:
    assert len(got) == len(expected)
    assert got == pytest.approx(expected, abs=1e-5)


def test_both_protocols_give_reward_scorer_rewards(server, scorer):
    eos, pad = scorer.tokenizer.eos_token, scorer.tokenizer.pad_token
    for n, offset in ((1, 0), (3, 1), (MAX_TEXTS, 4)):
        prompts, responses = pairs(n, offset)
        expected = scorer.score_pairs(prompts, responses)
        status, body = post(f"{server}/score", {"prompts": prompts, "responses": responses})
        assert status == 200 and list(body) == ["rewards"], body
        check_rewards(body["rewards"], expected)
        # OpenRLHF: full texts, maybe padded or with their EOS; labels/metas ignored
        queries = [p + r for p, r in zip(prompts, responses)]
        queries[0] = pad + queries[0] + eos + pad + pad
        payload = {"query": queries, "prompts": prompts, "labels": [""] * n, "metas": None}
        status, body = post(f"{server}/get_reward", payload)
        assert status == 200 and set(body) == {"rewards", "scores", "extra_logs"}, body
        check_rewards(body["rewards"], expected)
        assert body["scores"] == body["rewards"] == body["extra_logs"]["dummy_scores"]
    status, body = post(f"{server}/get_reward", {"query": ["###Human: Hi ###Assistant: Hello!"]})  # no prompts
    assert status == 200
    check_rewards(body["rewards"], scorer.score(["###Human: Hi ###Assistant: Hello!"]))


def test_strip_special_removes_whole_tokens_only():
    assert strip_special("<pad>a pad<|endoftext|><pad>", ("<pad>", "<|endoftext|>")) == "a pad"
    assert strip_special("pad>", ("<pad>",)) == "pad>"  # OpenRLHF's str.strip would eat the characters
    assert strip_special("<pad>", ("<pad>",)) == ""
    start = time.perf_counter()  # linear: a copy per stripped token would move 25 GB here
    assert strip_special("<pad>" * 100_000 + "x" + "<pad>" * 100_000, ("<pad>", "</s>")) == "x"
    assert time.perf_counter() - start < 2


def wave(server: str, requests: list[tuple[str, object]]) -> list[tuple[int, object]]:
    """All ``(path, payload)`` requests sent at once from one thread each (released together by a barrier)."""
    barrier = threading.Barrier(len(requests))

    def send(item):
        barrier.wait(timeout=60)
        return post(f"{server}{item[0]}", item[1])

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(send, requests))


def test_concurrent_clients_are_batched_and_bad_requests_change_nothing(server, scorer):
    before = request_json(f"{server}/stats")[1]
    good = {}
    requests = []
    for i in range(8):
        if i in (2, 5):  # bad requests in the same wave: refused alone, before they could join a batch
            requests.append(("/score", {"prompts": ["a"], "responses": ["b", "c"]} if i == 2 else b"{not json"))
            continue
        prompts, responses = pairs(1 + i, offset=10 * i)
        good[i] = scorer.score_pairs(prompts, responses)
        payload = {"prompts": prompts, "responses": responses}
        if i % 2:
            payload = {"query": [p + r for p, r in zip(prompts, responses)]}
        requests.append(("/get_reward" if i % 2 else "/score", payload))
    results = wave(server, requests)
    for i, (status, body) in enumerate(results):
        if i in good:
            assert status == 200, body
            check_rewards(body["rewards"], good[i])
        else:
            assert status == 400 and set(body) == {"error"}, body
    after = request_json(f"{server}/stats")[1]
    assert after["requests"] - before["requests"] == len(good)
    assert after["texts"] - before["texts"] == sum(len(v) for v in good.values())
    assert after["max_requests"] >= 2, after  # LitServe merged concurrent requests into one model call
    assert after["model_calls"] - before["model_calls"] < len(good)


def raw_request(server: str, head: bytes, body: bytes, read: bool) -> None:
    """A client that sends ``body`` after ``head`` and hangs up (``read``: after reading the answer)."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head + body)
        if read:
            sock.recv(65536)


def test_bad_requests_are_refused_in_one_line_and_the_server_keeps_serving(server, scorer):
    prompts, responses = pairs(2)
    long_response = " one plus one is two." * 200  # about 1,000 tokens: over the model's 512 positions
    cases = [
        ("/score", b"prompts=a", 400, "not JSON"),
        ("/score", b"[1, 2]", 400, "JSON object"),
        ("/score", b'{"prompts": ["a\\ud800"], "responses": ["b"]}', 400, "cannot be tokenized"),
        ("/score", {"prompts": "a", "responses": "b"}, 400, "non-empty list of strings"),
        ("/score", {"prompts": ["a", 3], "responses": ["b", "c"]}, 400, '"prompts"[1] is int'),
        ("/score", {"prompts": [], "responses": []}, 400, "non-empty list"),
        ("/score", {"prompts": ["a"]}, 400, '"responses" must be a non-empty list of strings, got missing'),
        ("/score", {"prompts": prompts, "responses": responses[:1]}, 400, "2 prompts but 1 responses"),
        ("/score", {"prompts": ["a"] * 17, "responses": ["b"] * 17}, 413, "max_texts_per_request=16"),
        ("/score", {"prompts": prompts, "responses": [responses[0], long_response]}, 413, "over max_length=512"),
        ("/score", {"prompts": ["x" * 2**20], "responses": ["b"]}, 413, "too large"),
        ("/get_reward", {"prompts": ["a"]}, 400, '"query" must be a non-empty list'),
        ("/get_reward", {"query": ["a", "b"], "prompts": ["a"]}, 400, "1 prompts but 2 queries"),
    ]
    for path, payload, status, fragment in cases:
        got, body = post(f"{server}{path}", payload)
        assert got == status and isinstance(body, dict) and list(body) == ["error"], (path, payload, got, body)
        assert fragment in body["error"] and "\n" not in body["error"], body
    head = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    whole = json.dumps({"prompts": prompts, "responses": responses}).encode()
    raw_request(server, head % (len(whole) + 100), whole[:20], read=False)  # hangs up mid-body
    raw_request(server, head % len(whole), whole, read=False)  # hangs up before its answer
    status, body = post(f"{server}/score", {"prompts": prompts, "responses": responses})
    assert status == 200
    check_rewards(body["rewards"], scorer.score_pairs(prompts, responses))
    assert request_json(f"{server}/stats")[1]["errors"]["413"] >= 3


def test_health_and_info(server, rm_folder):
    assert request_json(f"{server}/health") == (200, "ok")
    status, info = request_json(f"{server}/info")
    model = info["model"]
    assert status == 200 and model["model_name_or_path"] == str(rm_folder)
    assert "EOS" in model["text_rule"] and model["max_length"] == model["model_positions"] == 512
    assert model["limits"]["max_texts_per_request"] == MAX_TEXTS and model["limits"]["max_batch_size"] == 4
    assert model["eos_token"] != model["pad_token"] and model["dtype"] == "float32"


def test_not_a_reward_model_is_refused_in_one_line(tiny):
    cmd = [sys.executable, str(ROOT / "recipes" / "serve_rm.py"), "--model_name_or_path", str(tiny["base"])]
    proc = run_process([*cmd, "--port", "18099", "--device", "cpu"], usual_seconds=20, cwd=ROOT)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hhrm: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "model_name_or_path=" in lines[0] and "not a reward model" in lines[0]


def test_limits_over_the_model_and_a_busy_port_are_refused(rm_folder):
    with pytest.raises(ValueError, match="over the model's 512 positions"):
        serve_rm.build_server(serve_rm.ServeConfig(model_name_or_path=str(rm_folder), device="cpu", max_length=513))
    with pytest.raises(ValueError, match="host="):
        serve_rm.ServeConfig(model_name_or_path=str(rm_folder), host="10.0.0.1")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = serve_rm.ServeConfig(model_name_or_path=str(rm_folder), device="cpu", port=busy.getsockname()[1])
        with pytest.raises(ConnectionError, match="choose another --port"):
            serve_rm.build_server(config)


# --------------------------------------------------------------------------------------------
# Bounded requests, routes, and a server that never outlives its supervisor nor its model process


def test_only_the_documented_routes_answer(server):
    for path in ("/", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/predict", "/shutdown"):
        status, body = request_json(f"{server}{path}", timeout=10)
        assert status == 404 and list(body) == ["error"] and "POST /score" in body["error"], (path, status, body)
    status, body = post(f"{server}/health", {})
    assert status == 405 and "\n" not in body["error"], body
    for path in ("/health", "/info", "/stats"):
        assert request_json(f"{server}{path}", timeout=10)[0] == 200


def test_the_character_cap_never_refuses_a_text_that_fits(server, scorer):
    """The cap is max_length x the longest token: 512 copies of the longest token (EOS, 13 characters) are exactly
    512 tokens and exactly the cap, so they are scored; one character more is refused before tokenizing."""
    status, info = request_json(f"{server}/info")
    limits = info["model"]["limits"]
    eos = scorer.tokenizer.eos_token
    assert limits["token_chars"] == max(map(len, scorer.tokenizer.get_vocab())) == len(eos)
    assert limits["max_text_chars"] == 512 * len(eos)
    status, body = post(f"{server}/score", {"prompts": [eos * 256], "responses": [eos * 256]})
    assert status == 200, body
    check_rewards(body["rewards"], scorer.score([eos * 512]))
    status, body = post(f"{server}/score", {"prompts": ["x" + eos * 256], "responses": [eos * 256]})
    assert status == 413 and "6657 characters, over max_length=512 tokens x 13" in body["error"], body


def test_the_default_body_limit_is_what_the_texts_need(rm_folder):
    def limits(**kwargs) -> dict:
        config = serve_rm.ServeConfig(model_name_or_path=str(rm_folder), device="cpu", port=free_port(), **kwargs)
        return serve_rm.build_server(config).model_metadata["limits"]

    derived = limits(max_texts_per_request=8)
    assert derived["max_text_chars"] == 512 * 13
    assert derived["max_request_bytes"] == 8 * 512 * 13 * 6 + 2**16  # each character JSON-escaped (\\uXXXX)
    assert limits(max_texts_per_request=8, max_request_bytes=12_345)["max_request_bytes"] == 12_345
    assert limits(max_texts_per_request=10**6)["max_request_bytes"] == 32 * 2**20  # never over the former default


def server_tree(port: int) -> list[psutil.Process]:
    """The processes of the server listening on ``port``: the recipe's supervisor and server (``--port`` in their
    command line), LitServe's processes under them."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if str(RECIPE) in cmd and str(port) in cmd:
            roots.append(proc)
    tree = {p.pid: p for root in roots for p in [root, *root.children(recursive=True)]}
    return list(tree.values())


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            pass
    return out


def tree_rss(procs: list[psutil.Process]) -> int:
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def test_hostile_bodies_are_refused_fast_in_bounded_memory(server, scorer):
    """Bodies just under max_request_bytes (1 MiB here), each one long text or thousands of empty lists, 6 at once, 3
    times: each is refused (413, one line) in seconds, and the server's processes together never grow by more than
    a few times the bodies in flight (tokenizing each text whole took ~0.5 GB and ~1 s a megabyte)."""
    procs = server_tree(int(server.rsplit(":", 1)[1]))
    assert len(procs) >= 5, procs  # supervisor, server, queue manager, model and HTTP processes
    long_text = "x" * (2**20 - 100)
    bodies = [
        ("/score", {"prompts": [long_text], "responses": ["b"]}, "over max_length=512 tokens"),
        ("/get_reward", {"query": ["<pad>" + long_text]}, "over max_length=512 tokens"),
        ("/score", b'{"prompts": [' + b"[]," * 300_000 + b'[]], "responses": ["b"]}', "outside strings"),
    ]
    peak, baseline, done = [0], tree_rss(procs), threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(procs))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for _ in range(3):
            start = time.monotonic()
            results = wave(server, [bodies[i % len(bodies)][:2] for i in range(6)])
            seconds = time.monotonic() - start
            for i, (status, body) in enumerate(results):
                fragment = bodies[i % len(bodies)][2]
                assert status == 413 and fragment in body["error"] and "\n" not in body["error"], body
            assert seconds < 20, seconds  # the whole wave; each is refused in milliseconds on an idle machine
    finally:
        done.set()
        sampler.join()
    assert peak[0] - baseline < 150 * 2**20, (baseline / 2**20, peak[0] / 2**20)
    prompts, responses = pairs(2)  # and it still serves
    status, body = post(f"{server}/score", {"prompts": prompts, "responses": responses})
    assert status == 200
    check_rewards(body["rewards"], scorer.score_pairs(prompts, responses))


def free_again(port: int, within: float) -> bool:
    """Whether ``port`` can be listened on again (as the server binds it) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
        time.sleep(0.1)


def test_kill_9_of_the_recipe_leaves_nothing_running(rm_folder, tmp_path):
    """kill -9 of the process `make serve-rm` starts: LitServe's manager, model and HTTP processes and the resource
    tracker are gone within seconds, and the port is free again."""
    port = free_port()
    cmd = [sys.executable, str(RECIPE), "--model_name_or_path", str(rm_folder), "--port", str(port)]
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen([*cmd, *SERVER_ARGS], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    procs = []
    try:
        deadline = time.monotonic() + 600
        while request_json_or_none(f"http://127.0.0.1:{port}/health") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        procs = server_tree(port)
        assert len(procs) >= 5 and procs[0].pid == proc.pid, procs
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while alive(procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(procs), [p.cmdline() for p in alive(procs)]
        assert free_again(port, within=5)
    finally:
        for p in alive(procs):
            p.kill()


def request_json_or_none(url: str, payload=None, timeout: float = 10):
    try:
        return request_json(url, payload, timeout=timeout)[0]
    except OSError:
        return None


def test_a_dead_model_process_is_answered_503_and_ends_the_server(rm_folder, tmp_path):
    """A stuck model process: 504 at request_timeout. Killed: the request waiting on it is answered 503 (one line),
    /health is no longer 200, and the server exits with one line, leaving nothing running; nothing hangs."""
    log = tmp_path / "server.log"
    args = (*SERVER_ARGS, "--request_timeout", "5")
    with launch(rm_folder, *args, ready_timeout=600, log=log) as url:
        port = int(url.rsplit(":", 1)[1])
        procs = server_tree(port)
        model = [p for p in procs if "spawn_main" in " ".join(p.cmdline())]
        assert len(model) == 1, [p.cmdline() for p in procs]
        model[0].suspend()
        start = time.monotonic()
        status, body = post(f"{url}/score", {"prompts": ["a"], "responses": ["b"]}, timeout=60)
        assert status == 504 and "request_timeout=5.0" in body["error"], body
        assert 4 < time.monotonic() - start < 30
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(post, f"{url}/score", {"prompts": ["a"], "responses": ["b"]}, 60)
            time.sleep(1)
            model[0].kill()
            start = time.monotonic()
            status, body = waiting.result(timeout=60)
        assert status == 503 and "the model process" in body["error"] and "\n" not in body["error"], body
        assert time.monotonic() - start < 10
        assert request_json_or_none(f"{url}/health") != 200
        deadline = time.monotonic() + 10
        while alive(procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(procs), [p.cmdline() for p in alive(procs)]
        assert request_json_or_none(f"{url}/score", {"prompts": ["a"], "responses": ["b"]}) is None
        assert free_again(port, within=5)
    lines = [line for line in log.read_text().splitlines() if line.startswith("hhrm: error:")]
    assert len(lines) == 1 and "the model process" in lines[0], log.read_text()[-3000:]


# --------------------------------------------------------------------------------------------
# The reward convention: the server scores exactly as RewardScorer under it, and `make score` through it


def test_a_pad_is_eos_rm_is_served_by_its_convention(card_server, pad_is_eos_folder, scorer, tiny, tmp_path):
    card = scoring.RewardScorer.from_pretrained(
        pad_is_eos_folder, device="cpu", dtype=torch.float32, convention="card-pipeline"
    )
    prompts, responses = pairs(MAX_TEXTS, 3)
    expected = card.score_pairs(prompts, responses)
    assert not scorer.score_pairs(prompts, responses) == pytest.approx(expected, abs=1e-3)  # hhrm's differs
    status, body = post(f"{card_server}/score", {"prompts": prompts, "responses": responses})
    assert status == 200, body
    check_rewards(body["rewards"], expected)
    queries = [p + r for p, r in zip(prompts, responses)]
    for payload in ({"query": queries}, {"query": queries, "prompts": prompts}):  # concat: prompts not needed
        status, body = post(f"{card_server}/get_reward", payload)
        assert status == 200, body
        check_rewards(body["rewards"], expected)
    info = request_json(f"{card_server}/info")[1]["model"]
    assert (
        info["convention"] == "card-pipeline"
        and "reward_convention=card-pipeline: text=concat, eos=keep" in (info["text_rule"])
    )
    assert request_json(f"{card_server}/info")[1]["model"]["pad_token"] == info["eos_token"]
    # make score through the server (reward_model_url) gives the folder's rewards, and records the convention.
    from trl import ModelConfig

    from hhrm.reporting import read_jsonl
    from hhrm.reward import score_file

    from conftest import load_recipe

    rows = tiny["data"] / "test.jsonl"
    data_args = score_file.ScoreDataArguments(dataset_name=str(rows), max_rows=10)
    got = {}
    for name, kwargs, model in (
        ("url", {"reward_model_url": card_server}, None),
        ("folder", {"reward_convention": "card-pipeline"}, str(pad_is_eos_folder)),
    ):
        args = score_file.ScoreConfig(output_file=str(tmp_path / f"{name}.jsonl"), progress=False, **kwargs)
        metrics = load_recipe("score").main(data_args, args, ModelConfig(model_name_or_path=model))
        assert metrics["reward_convention"] == "card-pipeline" and metrics["scored"] == 10, metrics
        got[name] = [
            r[c] for r in read_jsonl(tmp_path / f"{name}.jsonl") for c in ("chosen_reward", "rejected_reward")
        ]
    assert metrics["reward"]["weights"] and len(got["url"]) == 20
    assert got["url"] == pytest.approx(got["folder"], abs=1e-5)


def test_conventions_on_the_server_are_checked_before_it_starts(pad_is_eos_folder, rm_folder):
    def build(folder, convention):
        config = serve_rm.ServeConfig(
            model_name_or_path=str(folder), device="cpu", port=free_port(), reward_convention=convention
        )
        return serve_rm.build_server(config)

    with pytest.raises(ValueError, match="reward_convention='nope' is not a reward convention: one of hhrm,") as err:
        build(rm_folder, "nope")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"pad == EOS\) and its config.json records no reward_convention"):
        build(pad_is_eos_folder, None)
    with pytest.raises(ValueError, match="reward_convention='hhrm': the reward tokenizer needs a pad token distinct"):
        build(pad_is_eos_folder, "hhrm")
    assert build(rm_folder, None).model_metadata["convention"] == "hhrm"  # pad != EOS, nothing recorded: hhrm's


def test_get_reward_splits_queries_for_conventions_that_need_the_prompt(scorer):
    """A chat-template or text-pair convention needs (prompt, response) apart: /get_reward cuts each query after its
    prompt (pad/EOS stripped from both), and refuses, in one line, a request without prompts or a query that does not
    start with its prompt."""
    tok, verl = scorer.tokenizer, conventions.PRESETS["verl-vllm"]
    pad, eos = tok.pad_token, tok.eos_token
    data = {"query": [pad + "###Human: Hi ###Assistant: Hello!" + eos], "prompts": ["###Human: Hi ###Assistant:"]}
    assert protocol.get_reward_pairs(data, 4, tok, verl) == (["###Human: Hi ###Assistant:"], [" Hello!"])
    assert protocol.get_reward_pairs(data, 4, tok, conventions.HHRM) == ([""], ["###Human: Hi ###Assistant: Hello!"])
    for bad, fragment in (
        ({"query": data["query"]}, 'needs each query\'s prompt apart: send "prompts"'),
        ({"query": data["query"], "prompts": ["###Human: Bye ###Assistant:"]}, "query 0 does not start with its"),
    ):
        with pytest.raises(protocol.RequestError, match=fragment) as err:
            protocol.get_reward_pairs(bad, 4, tok, verl)
        assert err.value.status == 400 and "reward_convention='verl-vllm'" in err.value.message


# --------------------------------------------------------------------------------------------
# A reward ensemble served: the rule's rewards and, per text, the members' mean, std and rewards


@pytest.fixture(scope="module")
def ensemble_folders(rm_folder, tmp_path_factory) -> list[str]:
    """``rm_folder`` and a copy whose score head is moved by seeded noise: two members that disagree."""
    folder = tmp_path_factory.mktemp("serve_rm_member") / "rm"
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(rm_folder)
    with torch.no_grad():
        model.score.weight.add_(torch.randn_like(model.score.weight) * 0.1 * model.score.weight.std())
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(rm_folder).save_pretrained(folder)
    return [str(rm_folder), str(folder)]


ENSEMBLE_ARGS = ("--reward_aggregation", "uwo", "--reward_uwo_lambda", "0.5")


@pytest.fixture(scope="module")
def ensemble_server(ensemble_folders, tmp_path_factory):
    from bench.servers import launch_process

    log = tmp_path_factory.mktemp("serve_rm_ensemble_log") / "server.log"
    port = free_port()
    cmd = [sys.executable, str(RECIPE), "--reward_ensemble", *ensemble_folders, "--port", str(port)]
    with launch_process([*cmd, *ENSEMBLE_ARGS, *SERVER_ARGS], f"http://127.0.0.1:{port}", 600, log) as url:
        yield url


def check_summary(body: dict, expected: dict, keys: dict) -> None:
    """``body``'s fields (``keys``: field -> summary key) equal the in-process summary within 1e-5."""
    for field, key in keys.items():
        got, want = body[field], expected[key]
        assert len(got) == len(want), field
        if key == "members":
            assert [len(m) for m in got] == [len(m) for m in want] == [2] * len(want)
            got, want = [r for m in got for r in m], [r for m in want for r in m]
        assert got == pytest.approx(want, abs=1e-5), field


def test_an_ensemble_answers_its_members_mean_and_std(ensemble_server, ensemble_folders):
    from hhrm.reward import sources

    args = sources.RewardArguments(
        reward_ensemble=ensemble_folders, reward_aggregation="uwo", reward_uwo_lambda=0.5, reward_batch_size=4
    )
    source = sources.build(args, "cpu", torch.float32)
    requests, expected = [], []
    for i, (n, offset) in enumerate(((1, 0), (3, 1), (5, 4), (MAX_TEXTS, 9))):  # released together: batched
        prompts, responses = pairs(n, offset)
        expected.append(source.score_members(prompts, responses))
        payload = {"prompts": prompts, "responses": responses}
        requests.append(
            ("/get_reward", {"query": [p + r for p, r in zip(prompts, responses)]}) if i % 2 else ("/score", payload)
        )
    for (path, _), (status, body), want in zip(requests, wave(ensemble_server, requests), expected):
        assert status == 200, body
        if path == "/score":
            assert list(body) == ["rewards", "mean", "std", "members"], body
            check_summary(body, want, {"rewards": "reward", "mean": "mean", "std": "std", "members": "members"})
        else:
            assert set(body) == {"rewards", "scores", "extra_logs"} and body["scores"] == body["rewards"], body
            assert set(body["extra_logs"]) == set(protocol.EXTRA_LOGS), body
            logs = body["extra_logs"] | {"rewards": body["rewards"]}
            check_summary(logs, want, {"rewards": "reward", "dummy_scores": "reward", "reward_mean": "mean"})
            check_summary(logs, want, {"reward_std": "std"})
        assert min(want["std"]) > 1e-3 and want["reward"] != pytest.approx(want["mean"], abs=1e-4)  # uwo: not mean
    info = request_json(f"{ensemble_server}/info")[1]["model"]
    assert info["ensemble"] == {"members": ensemble_folders, "aggregation": "uwo", "uwo_lambda": 0.5}
    assert info["model_name_or_path"].startswith("ensemble (uwo, lambda 0.5) of ") and len(info["weights"]) == 2
    assert request_json(f"{ensemble_server}/stats")[1]["texts"] >= 1 + 3 + 5 + MAX_TEXTS
    # hhrm's client reads the member rewards too, a request of at most batch_size texts at a time
    from hhrm.reward.client import HhrmServer

    client = HhrmServer(ensemble_server, batch_size=3)
    prompts, responses = pairs(7, 2)
    got, want = client.score_members(prompts, responses), source.score_members(prompts, responses)
    check_summary(got, want, {"reward": "reward", "mean": "mean", "std": "std", "members": "members"})
    assert client.score_pairs(prompts, responses) == pytest.approx(want["reward"], abs=1e-5)
    assert client.identity()["ensemble"] == info["ensemble"]


def test_a_single_rm_answers_no_ensemble_fields(server, scorer):
    prompts, responses = pairs(2)
    status, body = post(f"{server}/score", {"prompts": prompts, "responses": responses})
    assert status == 200 and list(body) == ["rewards"], body
    status, body = post(f"{server}/get_reward", {"query": [p + r for p, r in zip(prompts, responses)]})
    assert status == 200 and list(body["extra_logs"]) == ["dummy_scores"], body
    check_rewards(body["rewards"], scorer.score_pairs(prompts, responses))
    info = request_json(f"{server}/info")[1]["model"]
    assert "ensemble" not in info and "fields" not in info
    from hhrm.reward.client import HhrmServer

    client = HhrmServer(server)
    assert "ensemble" not in client.identity() and not client.with_members
    with pytest.raises(ValueError, match="serves one reward model: it has no member rewards"):
        client.score_members(prompts, responses)


def test_ensemble_settings_are_refused_in_one_line(rm_folder, ensemble_folders, pad_is_eos_folder):
    cases = [
        (dict(model_name_or_path=str(rm_folder), reward_ensemble=ensemble_folders), "both set"),
        (dict(reward_ensemble=ensemble_folders[:1], reward_aggregation="worst"), "needs reward_ensemble with E >= 2"),
        (dict(reward_ensemble=ensemble_folders, reward_uwo_lambda=-1.0), "reward_uwo_lambda=-1.0: must be >= 0"),
        (dict(), "model_name_or_path is required"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(ValueError, match=fragment) as err:
            serve_rm.ServeConfig(device="cpu", **kwargs)
        assert "\n" not in str(err.value)
    members = [str(rm_folder), str(pad_is_eos_folder)]  # one convention, but the pad tokens differ
    config = serve_rm.ServeConfig(
        device="cpu", port=free_port(), reward_ensemble=members, reward_convention="card-pipeline"
    )
    with pytest.raises(ValueError, match=r"reward_ensemble: member 2 .* has another tokenizer than member 1"):
        serve_rm.build_server(config)  # refused before anything starts
