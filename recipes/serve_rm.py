"""Serve a reward model over HTTP (LitServe, dynamic batching): hhrm's /score and OpenRLHF's /get_reward.

    python recipes/serve_rm.py --model_name_or_path outputs/tiny/rm [--port 8000] [--device cuda] [--bf16 true]
    make serve-rm MODEL=outputs/tiny/rm [PORT=8000] [ARGS="--max_batch_size 32 --max_texts_per_request 512"]

One model process on one device, no accelerate; a config file works too (--config serve.yaml). Listens on
127.0.0.1 unless --host 0.0.0.0 (the server has no authentication). Stop it with Ctrl-C.

    curl -s localhost:8000/score -d '{"prompts": ["###Human: Hi ###Assistant:"], "responses": [" Hello!"]}'
    -> {"rewards": [0.83]}
    curl -s localhost:8000/get_reward -d '{"query": ["###Human: Hi ###Assistant: Hello!"]}'
    -> {"rewards": [0.83], "scores": [0.83], "extra_logs": {"dummy_scores": [0.83]}}

GET /health (200 once the model is loaded), /info (model, text rule, max length, limits), /stats (batch fill).
Rewards are RewardScorer's (text + EOS, read at the EOS), whatever the batching. See hhrm.serve_rm.
"""

from trl import TrlParser

from hhrm import serve_rm
from hhrm.runtime import setup_logging


def main(args: serve_rm.ServeConfig) -> None:
    ################
    # Refuse before anything starts: a folder that is not a reward model, a max_length over its positions, a port
    # in use. Then serve until interrupted: LitServe's HTTP process checks and tokenizes each request, its model
    # process scores LitServe's batches of requests with RewardScorer
    ################
    server = serve_rm.build_server(args)
    print(
        f"serving reward model {args.model_name_or_path} on {args.device} at http://{args.host}:{args.port} "
        "(POST /score, POST /get_reward; GET /health, /info, /stats)",
        flush=True,
    )
    serve_rm.serve(server, args)


if __name__ == "__main__":
    from hhrm.runtime import refusals_in_one_line

    with refusals_in_one_line():  # a refusal: one line `hhrm: error: ...`, exit code 2
        parser = TrlParser((serve_rm.ServeConfig,))
        (args,) = parser.parse_args_and_config()
        setup_logging()
        main(args)
