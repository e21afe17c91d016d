"""RAFT stage: reward-ranked fine-tuning, best of K samples per prompt, resumable stage by stage.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/raft.py --config recipes/configs/tiny/raft.yaml
    make raft [CONFIG=...] [ARGS="--field value ..."]

Re-running the same command after an interruption resumes at the first unfinished stage.
"""

import hhrm  # noqa: F401  (first: quiets bitsandbytes' optional-kernels warning)

# isort: split
from trl import ModelConfig, TrlParser

from hhrm import data, reporting
from hhrm.raft import RaftConfig, RaftRunner, StopRequested
from hhrm.raft.report import HEADLINE
from hhrm.runtime import setup_logging


def main(data_args: data.DataArguments, args: RaftConfig, model_args: ModelConfig) -> dict:
    ################
    # Prompts, held-out set and models (loaded when a stage needs them)
    ################
    runner = RaftRunner(args, data_args, model_args)

    ################
    # Iterations: draw, generate, score, select, train, metrics; then the final evaluation
    ################
    try:
        metrics = runner.run()
    except BaseException:
        runner.close(failed=True)
        raise
    runner.close()
    runner.state.print(f"RAFT policy saved to {args.output_dir}: " + reporting.headline(metrics, HEADLINE))
    return metrics


if __name__ == "__main__":
    from hhrm.lifetime import exit_with_parent
    from hhrm.runtime import refusals_in_one_line

    with refusals_in_one_line():  # a refusal: one line `hhrm: error: ...`, exit code 2
        exit_with_parent()  # started by a supervisor (hhrm.lifetime.supervise): die with it
        parser = TrlParser((data.DataArguments, RaftConfig, ModelConfig))
        data_args, args, model_args = parser.parse_args_and_config()
        setup_logging()
        try:
            main(data_args, args, model_args)
        except StopRequested as stop:  # stop_after: a planned stop, not a failure
            print(stop)
