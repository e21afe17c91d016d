"""The embedded preference data and its gold reward: generated deterministically, graded by re-deriving answers."""

import random

import pytest

from hhrm import data, formatting, synthetic


def test_generation_is_deterministic_and_seeded():
    assert synthetic.generate(50, seed=3) == synthetic.generate(50, seed=3)
    assert synthetic.generate(50, seed=3) != synthetic.generate(50, seed=4)


def test_gold_reward_agrees_with_every_preference():
    rows = synthetic.generate(1000, seed=1)
    ds, report = data.normalize_rows(rows, "raw", "gen")
    assert report.dropped == 0 and len(ds) == 1000
    right_chosen = wrong_but_well_formed = 0
    for row in ds:
        chosen, rejected = (synthetic.gold_reward(row["prompt"], row[k]) for k in ("chosen", "rejected"))
        assert rejected == 0.0
        right_chosen += chosen
        if chosen == 0.0:  # a wrong attempt preferred to a refusal, as in real preference data
            assert row["rejected"].strip() in synthetic.REFUSALS and row["chosen"].strip() not in synthetic.REFUSALS
        else:
            wrong_but_well_formed += row["rejected"].strip() not in synthetic.REFUSALS
    assert right_chosen / len(ds) == pytest.approx(1 - synthetic.WRONG_CHOSEN_SHARE, abs=0.05)
    # Most rejections of right answers are wrong answers in the right form: style cannot separate them.
    assert wrong_but_well_formed / right_chosen > 0.75
    assert {synthetic.task_name(p) for p in ds["prompt"]} == {t.name for t in synthetic.TASKS}


def test_rejections_include_the_policy_typical_miscopy():
    rng = random.Random(0)
    task = next(t for t in synthetic.TASKS if t.name == "compare")
    answers = {synthetic._rejected_answer(rng, task, (43, 32), "near_question") for _ in range(200)}
    # One operand miscopied, the rest of the sentence in the chosen answer's form.
    assert "Of 43 and 32, the larger is 43." not in answers
    assert any(a.startswith("Of 43 and ") and not a.startswith("Of 43 and 32,") for a in answers)
    assert any(a.startswith("Of ") and a.endswith("and 32, the larger is 43.") and "Of 43 " not in a for a in answers)


@pytest.mark.parametrize(
    "question, good, bad",
    [
        ("How many centimeters are in 7 meters?", " 7 meters is 700 centimeters.", " 8 meters is 700 centimeters."),
        ("Which number is larger, 12 or 41?", " Of 12 and 41, the larger is 41.", " Of 12 and 41, the larger is 12."),
        ("Which number is larger, 12 or 41?", " 41", " Of 12 and 40, the larger is 41."),  # miscopied operand
        ("How many centimeters are in 3 meters?", " 3 meters is 300 centimeters.", " 3 meters is 30 centimeters."),
        (
            "How many words are in this list: apple river stone?",
            " There are 3 words in the list.",
            " There are 4 words.",
        ),
        ("How many words are in this list: apple river stone?", " There are 3 words in the list.", " I don't know."),
    ],
)
def test_gold_reward_grades_free_text(question, good, bad):
    prompt = formatting.make_prompt([("Human", question)])
    assert synthetic.gold_reward(prompt, good) == 1.0
    assert synthetic.gold_reward(prompt, bad) == 0.0
    # Text after the model opens a new turn does not count.
    assert synthetic.gold_reward(prompt, bad + " ###Human:" + good) == 0.0


def test_gold_reward_rejects_foreign_prompts():
    with pytest.raises(ValueError, match="not a generated prompt"):
        synthetic.gold_reward("###Human: How do I bake bread? ###Assistant:", " Flour.")


def test_gold_summary_per_task():
    p_cnv = formatting.make_prompt([("Human", "How many centimeters are in 1 meters?")])
    p_cmp = formatting.make_prompt([("Human", "Which number is larger, 10 or 20?")])
    out = synthetic.gold_summary([p_cnv, p_cnv, p_cmp], [" 1 meters is 100 centimeters.", " 3", " 20"])
    assert out["gold_accuracy"] == pytest.approx(2 / 3)
    assert out["gold_accuracy_convert"] == 0.5 and out["gold_accuracy_compare"] == 1.0


def test_only_generated_prompts_are_gold_checkable():
    generated = formatting.make_prompt([("Human", "Which number is larger, 10 or 20?")])
    assert synthetic.is_gold_checkable([generated])
    assert not synthetic.is_gold_checkable([generated, "###Human: How do I bake bread? ###Assistant:"])
    assert not synthetic.is_gold_checkable([])
