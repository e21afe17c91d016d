"""Best-of-n over-optimisation curve: the reward model's best-of-n pick against the gold reward, n = 1 .. n_max.

    python recipes/overopt.py --model_name_or_path outputs/tiny/sft --reward_model_name_or_path outputs/tiny/rm \
        --dataset_name outputs/tiny/data --test_offset 500 --output_dir outputs/tiny/overopt
    make overopt [POLICY=outputs/tiny/raft] [RM=outputs/tiny/rm] [ARGS="--n_max 32 --heldout_prompts 100"]

Samples n_max responses per held-out prompt once, then for n = 1, 2, 4, ..., n_max writes the proxy reward and
the gold accuracy of the RM's best-of-n pick (exact over all n-subsets, 95% interval from the prompts), the KL
bound log n - (n-1)/n and the gold pick's ceiling: overopt.json, overopt.md, overopt.png (against sqrt(KL)) and
samples.jsonl (to recompute the curve: hhrm.overopt.curve_from_samples). One process; a config file works too.
The reward model comes through hhrm.reward.sources: --reward_model_name_or_path (with --reward_convention for a
pad == EOS RM that records none) or --reward_model_url (a reward server, make serve-rm), or an ensemble of E folders
that picks by a rule (overopt.json's reward_aggregation; samples.jsonl keeps each member's reward):
    python recipes/overopt.py ... --reward_ensemble outputs/tiny/rm_s0 outputs/tiny/rm_s1 outputs/tiny/rm_s2 \
        --reward_aggregation uwo --reward_uwo_lambda 0.5
Regularised best-of-n (RBoN-KL, Jinnai et al. 2024) beside the plain curve, on the same samples: --kl_betas 0.1 0.3
picks argmax proxy + beta * log pi(y|x) (log pi under the policy, summed over the response tokens; samples.jsonl then
records it as logprobs; overopt.json's regularised, overopt.md's second table).
"""

import hhrm  # noqa: F401  (first: quiets bitsandbytes' optional-kernels warning)

# isort: split
from trl import ModelConfig, TrlParser

from hhrm import data, overopt, reporting
from hhrm.runtime import setup_logging

HEADLINE = ("n", "sqrt_kl", "proxy_mean", "gold_mean", "gold_ceiling_mean")


def main(data_args: data.DataArguments, args: overopt.OverOptConfig, model_args: ModelConfig) -> dict:
    ################
    # Sample n_max responses per held-out prompt from the policy, score them with the RM (and gold where the
    # prompts allow), then the curve for n = 1 .. n_max and its files
    ################
    result = overopt.run(args, data_args, model_args)
    for row in result["curve"]:
        print(reporting.headline(row, HEADLINE))
    key = "gold" if result["gold"] else "proxy"
    for beta, rows in (result["regularised"] or {}).items():  # kl_betas: the RBoN-KL pick's gold accuracy per n
        print(
            f"RBoN-KL beta {beta}, {key}: " + ", ".join(f"n={r['n']} {reporting.fmt(r[key + '_mean'])}" for r in rows)
        )
    print(f"curve written to {args.output_dir} ({overopt.JSON_FILE}, {overopt.TABLE_FILE}, {overopt.PLOT_FILE})")
    return result


if __name__ == "__main__":
    from hhrm.lifetime import exit_with_parent
    from hhrm.runtime import refusals_in_one_line

    with refusals_in_one_line():  # a refusal: one line `hhrm: error: ...`, exit code 2
        exit_with_parent()  # started by a supervisor (hhrm.lifetime.supervise): die with it
        parser = TrlParser((data.DataArguments, overopt.OverOptConfig, ModelConfig))
        data_args, args, model_args = parser.parse_args_and_config()
        setup_logging()
        main(data_args, args, model_args)
