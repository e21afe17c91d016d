"""RAFT (update=sft) vs iterative DPO (update=dpo) on the same prompts and generation budget, several seeds.

    python recipes/compare.py [--seeds 0 1 2] [--output_dir outputs/tiny/compare] [--overrides num_iterations=1 ...]
    make compare [ARGS="--seeds 0 1 --launcher python"]

Both RAFT configs (sft_config, dpo_config) must agree on the prompts, K, iterations, sampling and models (refused
otherwise, naming the settings). Each (update, seed) is a RAFT run launched into <output_dir>/<update>_seed<seed>;
a finished run is resumed, so a second invocation only re-measures. Writes compare.json and compare.md (mean ±
std over seeds per update, then one row per run) and prints the table.
"""

import hhrm  # noqa: F401  (first: quiets bitsandbytes' optional-kernels warning)

# isort: split
from pathlib import Path

from trl import TrlParser

from hhrm import compare
from hhrm.runtime import setup_logging

RAFT_RECIPE = Path(__file__).resolve().with_name("raft.py")


def main(args: compare.CompareConfig) -> dict:
    ################
    # Check that the two configs share the budget, run or resume every (update, seed), then measure each run
    # from its folder (and the KL from its final policy) and write the comparison
    ################
    result = compare.run(args, RAFT_RECIPE)
    print(compare.markdown(result))
    print(f"comparison written to {args.output_dir} ({compare.JSON_FILE}, {compare.TABLE_FILE})")
    return result


if __name__ == "__main__":
    from hhrm.lifetime import exit_with_parent
    from hhrm.runtime import refusals_in_one_line

    with refusals_in_one_line():  # a refusal: one line `hhrm: error: ...`, exit code 2
        exit_with_parent()  # started by a supervisor (hhrm.lifetime.supervise): die with it
        (args,) = TrlParser((compare.CompareConfig,)).parse_args_and_config()
        setup_logging()
        main(args)
