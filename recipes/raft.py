"""RAFT stage: `accelerate launch recipes/raft.py --config recipes/configs/tiny/raft.yaml [--field value ...]`.

Re-running the same command after an interruption resumes from the last completed stage.
"""

from trl import ModelConfig, TrlParser

from hhrm import data, raft
from hhrm.runtime import setup_logging


def main() -> None:
    data_args, args, model_args = TrlParser((data.DataArguments, raft.RaftConfig, ModelConfig)).parse_args_and_config()
    setup_logging()
    runner = raft.RaftRunner(args, data_args, model_args)
    try:
        metrics = runner.run()
    except raft.StopRequested as stop:
        runner.state.print(str(stop))
        return
    finally:
        runner.close()
    runner.state.print(f"RAFT policy saved to {args.output_dir}: " + raft.headline_line(
        {k.removesuffix("_last"): v for k, v in metrics.items() if k.endswith("_last")}))


if __name__ == "__main__":
    main()
