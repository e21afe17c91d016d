"""WARM: average the weights of E reward models fine-tuned from one start into one reward model (Ramé et al. 2024).

    python recipes/warm_rm.py --members outputs/tiny/ensemble/rm_weak_s0 outputs/tiny/ensemble/rm_weak_s1 \
        --output_dir outputs/tiny/ensemble/rm_warm [--weights 0.5 0.5] [--overwrite_output_dir true]
    make warm-rm [CONFIG=recipes/configs/tiny/warm_rm.yaml] [MEMBERS="a b c"] [OUT=dir] [ARGS="--weights ..."]

The output is a normal one-label reward-model folder (the members' safetensors layout and dtype, config.json with
reward_convention and reward_start, tokenizer, a model card naming the members and weights): score it as any RM
(make score, make serve-rm, make overopt, RAFT's reward_model_name_or_path) at one model's cost. Refused in one
line before anything is written: fewer than 2 members, members of different starts (config.json's reward_start;
a member without it unless --assume_same_start true), other architectures, shapes, dtypes, tokenizers or
conventions, weights that are negative or do not sum to 1, a non-empty output_dir without --overwrite_output_dir.
See hhrm.rm.warm.
"""

import hhrm  # noqa: F401  (first: quiets bitsandbytes' optional-kernels warning)

# isort: split
from trl import TrlParser

from hhrm.rm import warm
from hhrm.runtime import setup_logging


def main(args: warm.WarmConfig) -> str:
    ################
    # Check every member (reward models of one start, one shape, one tokenizer and convention) and the output folder,
    # then average each tensor in fp32 and write the folder whole
    ################
    out = warm.average(args)
    weights = ", ".join(f"{w:.4g}" for w in args.weights)
    print(f"WARM reward model of {len(args.members)} members (weights {weights}) written to {out}")
    return str(out)


if __name__ == "__main__":
    from hhrm.lifetime import exit_with_parent
    from hhrm.runtime import refusals_in_one_line

    with refusals_in_one_line():  # a refusal: one line `hhrm: error: ...`, exit code 2
        exit_with_parent()  # started by a supervisor (hhrm.lifetime.supervise): die with it
        parser = TrlParser((warm.WarmConfig,))
        (args,) = parser.parse_args_and_config()
        setup_logging()
        main(args)
