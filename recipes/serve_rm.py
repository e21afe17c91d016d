"""Serve a reward model over HTTP (LitServe, dynamic batching): hhrm's /score and OpenRLHF's /get_reward.

    python recipes/serve_rm.py --model_name_or_path outputs/tiny/rm [--port 8000] [--device cuda] [--bf16 true]
        [--reward_convention card-pipeline]    (how the RM is scored; unset: what the folder records, else hhrm's)
    make serve-rm MODEL=outputs/tiny/rm [PORT=8000] [ARGS="--max_batch_size 32 --max_texts_per_request 512"]
    python recipes/serve_rm.py --reward_ensemble rm_s0 rm_s1 rm_s2 [--reward_aggregation uwo --reward_uwo_lambda 0.5]
        (E folders, one reward by the rule; /score adds mean, std and members per text, /get_reward's extra_logs
        reward_mean and reward_std)

One model process on one device, no accelerate; a config file works too (--config serve.yaml). Listens on
127.0.0.1 unless --host 0.0.0.0 (the server has no authentication). Stop it with Ctrl-C (or SIGTERM).

    curl -s localhost:8000/score -d '{"prompts": ["###Human: Hi ###Assistant:"], "responses": [" Hello!"]}'
    -> {"rewards": [0.83]}
    curl -s localhost:8000/get_reward -d '{"query": ["###Human: Hi ###Assistant: Hello!"]}'
    -> {"rewards": [0.83], "scores": [0.83], "extra_logs": {"dummy_scores": [0.83]}}

GET /health (200 once the model is loaded, 503 once it is gone), /info (model, text rule, max length, limits),
/stats (batch fill); nothing else answers. Rewards are RewardScorer's under the reward convention (hhrm's: text +
EOS, read at the EOS), whatever the batching; /info names the convention. A request is refused in one line (413)
over max_request_bytes (default: what max_texts_per_request texts need), or a text over max_length tokens, counted
in characters first (max_length x the longest token) so that a huge text is never tokenized (under a convention
that truncates, openrlhf's, a text over that character cap is refused, not cut). A request without rewards after
request_timeout: 504.

The process this starts is a thin supervisor: the server runs as its child, in a session of its own
(hhrm.lifetime.supervise), with LitServe's queue manager, model and HTTP processes beside it. Ctrl-C or SIGTERM to
the supervisor stops the server gracefully; if the supervisor is killed outright (kill -9), the child's watchdog
kills the whole server within a second, so nothing is left serving on the port. If the model process or LitServe's
queue dies, waiting requests are answered 503 and the server exits 1 in about a second, for whoever runs it to
restart it. Refusals (a folder that is not a reward model, a port in use) are one line, exit code 2.
See hhrm.reward.server.
"""

from __future__ import annotations

import hhrm  # noqa: F401  (first: quiets bitsandbytes' optional-kernels warning)

# isort: split
import os
import sys

from hhrm import lifetime  # the standard library only: the supervisor starts in a moment


def main(args) -> None:
    """Serve ``args`` (a :class:`hhrm.reward.server.ServeConfig`) until interrupted, in this process."""
    from hhrm.reward import server as serve_rm

    ################
    # Refuse before anything starts: a folder that is not a reward model, a convention that cannot score it, a
    # max_length over its positions, a port in use. Then serve until interrupted: LitServe's HTTP process checks
    # and tokenizes each request by the convention, its model process scores LitServe's batches with RewardScorer
    ################
    server = serve_rm.build_server(args)
    print(
        f"serving reward model {server.model_metadata['model_name_or_path']} "
        f"(reward_convention={server.model_metadata['convention']}) "
        f"on {args.device} at http://{args.host}:{args.port} "
        "(POST /score, POST /get_reward; GET /health, /info, /stats)",
        flush=True,
    )
    serve_rm.serve(server, args)


def supervised() -> bool:
    """Whether this process is the server child of a supervisor (hhrm.lifetime.supervise names its parent)."""
    return os.environ.get(lifetime.PARENT_ENV) == str(os.getppid())


if __name__ == "__main__":
    if not supervised():  # the supervisor: the server runs as a child that dies with this process, whole
        code = lifetime.supervise([sys.executable, os.path.abspath(__file__), *sys.argv[1:]])
        sys.exit(code if code >= 0 else 128 - code)  # killed by signal N: 128 + N, as a shell reports it
    lifetime.exit_with_parent()  # first: if the supervisor is killed outright, this kills the server's group

    from trl import TrlParser

    from hhrm.reward import server as serve_rm
    from hhrm.runtime import refusals_in_one_line, setup_logging

    with refusals_in_one_line():  # a refusal: one line `hhrm: error: ...`, exit code 2
        parser = TrlParser((serve_rm.ServeConfig,))
        (args,) = parser.parse_args_and_config()
        setup_logging()
        main(args)
