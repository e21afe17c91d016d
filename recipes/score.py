"""Score a data file with a reward model: every response, written back beside its row, with pairwise accuracy.

    python recipes/score.py --model_name_or_path outputs/tiny/rm --dataset_name pairs.jsonl --output_file scores.jsonl
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml recipes/score.py ...   (one shard per process)
    make score MODEL=outputs/tiny/rm DATA=pairs.jsonl OUT=scores.jsonl [ARGS="--use_chat_template true ..."]
    make score MODEL=seed_rm DATA=... OUT=... ARGS="--reward_convention card-pipeline"   (a pad == EOS RM)
    make score URL=http://10.0.0.2:8000 DATA=... OUT=...   (a reward server: make serve-rm; --reward_api openrlhf ...)

Input: any preference format (raw HH, dahoas, TRL conversational or standard) or prompt/response rows;
output: the same rows in the same order with chosen_reward/rejected_reward (or reward) columns, .jsonl or
.parquet, and <output_file>.metrics.json (accuracy for pairs, and what scored: the convention). The reward comes
through hhrm.reward.sources, as RAFT's does: --model_name_or_path (or --reward_model_name_or_path) is a folder,
scored under --reward_convention (unset: what the folder records, else hhrm's); --reward_model_url a server. A
config file works too: --config scoring.yaml.
"""

import hhrm  # noqa: F401  (first: quiets bitsandbytes' optional-kernels warning)

# isort: split
from trl import ModelConfig, TrlParser

from hhrm import reporting
from hhrm.reward import score_file
from hhrm.runtime import setup_logging


def main(data_args: score_file.ScoreDataArguments, args: score_file.ScoreConfig, model_args: ModelConfig) -> dict:
    ################
    # The reward source (a folder refused unless it is a reward model its convention can score, or a server), read
    # and render the rows, score this process's shard; the main process gathers the shards and writes every row back
    # with its rewards
    ################
    metrics = score_file.run(data_args, args, model_args.model_name_or_path)
    if metrics:
        print(f"scores written to {args.output_file}: " + reporting.headline(metrics, score_file.HEADLINE))
    return metrics


if __name__ == "__main__":
    from hhrm.lifetime import exit_with_parent
    from hhrm.runtime import refusals_in_one_line

    with refusals_in_one_line():  # a refusal: one line `hhrm: error: ...`, exit code 2
        exit_with_parent()  # started by a supervisor (hhrm.lifetime.supervise): die with it
        parser = TrlParser((score_file.ScoreDataArguments, score_file.ScoreConfig, ModelConfig))
        data_args, args, model_args = parser.parse_args_and_config()
        setup_logging()
        main(data_args, args, model_args)
