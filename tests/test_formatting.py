import pytest

from hhrm import formatting as f

RAW = "\n\nHuman: Can you help?  \n\nAssistant: Sure.\n\nHuman: What is 2 plus 2?\n\nAssistant: 2 plus 2 is 4."


def test_markers_rewritten_with_one_space_rule():
    assert f.rewrite_markers(RAW) == (
        "###Human: Can you help? ###Assistant: Sure. ###Human: What is 2 plus 2? ###Assistant: 2 plus 2 is 4."
    )
    assert "\n\nHuman:" not in f.rewrite_markers(RAW)


def test_prompt_response_split_round_trips():
    prompt, response = f.split_prompt_response(RAW)
    assert prompt == "###Human: Can you help? ###Assistant: Sure. ###Human: What is 2 plus 2? ###Assistant:"
    assert response == " 2 plus 2 is 4."
    assert prompt + response == f.rewrite_markers(RAW)
    # Already-rewritten text parses to the same turns.
    assert f.split_prompt_response(f.rewrite_markers(RAW)) == (prompt, response)


def test_card_example_is_a_fixed_point():
    text = "###Human: I have fresh whole chicken in my fridge. ###Assistant: Are you interested in a quick recipe?"
    assert f.rewrite_markers(text) == text


def test_split_requires_final_assistant_turn():
    with pytest.raises(ValueError, match="Assistant"):
        f.split_prompt_response("\n\nHuman: hello\n\nAssistant: hi\n\nHuman: bye")


def test_text_before_first_marker_is_an_error():
    with pytest.raises(ValueError, match="before the first turn marker"):
        f.parse_turns("stray words\n\nHuman: hi\n\nAssistant: yo")


def test_cut_at_next_turn():
    assert f.cut_at_next_turn(" 4. ###Human: and 3 plus 3?") == " 4."
    assert f.cut_at_next_turn(" 4.\n\nHuman: more") == " 4."
    assert f.cut_at_next_turn(" plain answer ") == " plain answer"


def test_last_human_turn():
    prompt, _ = f.split_prompt_response(RAW)
    assert f.last_human_turn(prompt) == "What is 2 plus 2?"


def test_turn_markers_tell_hh_text_from_plain_text():
    assert f.has_turn_markers(RAW) and f.has_turn_markers("###Human: hi ###Assistant:")
    assert f.has_turn_markers("Human: hi\n\nAssistant:") and f.has_turn_markers("\r\n\r\nHuman: hi\r\n\r\nAssistant:")
    assert not f.has_turn_markers("What did the Human: say?") and not f.has_turn_markers("plain question")
    assert f.normalize_newlines("a\r\nb\rc\n") == "a\nb\nc\n"
