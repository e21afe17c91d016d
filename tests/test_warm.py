"""WARM (hhrm.rm.warm, recipes/warm_rm.py): each averaged tensor is the members' fp32 weighted average, the folder is
a reward model every source scores, a model averaged with itself scores as itself, and members that cannot be
averaged (other starts, other shapes, no start recorded) or a bad setting are refused in one line before anything
is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hhrm import model_checks
from hhrm.reward import sources
from hhrm.rm import warm

from conftest import ROOT

PROMPTS = ["###Human: What is 2 plus 3? ###Assistant:"] * 3 + ["###Human: Count to three. ###Assistant:"]
RESPONSES = [" 5.", " 2 plus 3 is 5.", " 6.", " One, two, three."]


def _member(rm: Path, out: Path, seed: int, start: Path | None, hidden: int | None = None) -> Path:
    """A copy of ``rm`` with every weight moved by seeded noise (another fine-tune, as far as averaging goes), its
    config recording ``start`` as reward_start; ``hidden``: another MLP width (a model of another shape)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    if hidden:
        model = AutoModelForSequenceClassification.from_config(
            AutoConfig.from_pretrained(rm, intermediate_size=hidden)
        )
    else:
        model = AutoModelForSequenceClassification.from_pretrained(rm)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    if start is not None:
        model.config.reward_start = {"model": str(start), "weights": model_checks.weights_identity(str(start))}
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(rm).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def members(quick_models, tmp_path_factory) -> dict[str, Path]:
    """Three members of one start (the tiny base), one of another start, one of another shape, one without a start."""
    root, rm, base = tmp_path_factory.mktemp("warm"), quick_models["rm"], quick_models["policy"]
    made = {f"m{s}": _member(rm, root / f"m{s}", s, base) for s in (1, 2, 3)}
    made["other_start"] = _member(rm, root / "other_start", 4, rm)
    made["other_shape"] = _member(rm, root / "other_shape", 5, base, hidden=48)
    made["no_start"] = _member(rm, root / "no_start", 6, None)
    return made


def _rewards(folder: Path) -> list[float]:
    args = sources.RewardArguments(reward_model_name_or_path=str(folder))
    return sources.build(args, "cpu", torch.float32).score_pairs(PROMPTS, RESPONSES)


def test_each_tensor_is_the_weighted_fp32_average_and_the_folder_scores(members, tmp_path):
    for names, weights in ((("m1", "m2", "m3"), None), (("m1", "m2"), [0.25, 0.75])):
        folders = [str(members[n]) for n in names]
        out = warm.average(
            warm.WarmConfig(members=folders, weights=weights, output_dir=str(tmp_path / "_".join(names)))
        )
        got, states = load_file(out / "model.safetensors"), [load_file(Path(f) / "model.safetensors") for f in folders]
        w = weights or [1 / len(folders)] * len(folders)
        assert set(got) == set(states[0])
        for name, tensor in got.items():
            expected = sum(wi * s[name].to(torch.float32) for wi, s in zip(w, states))  # the same fp32 sum, in order
            assert tensor.dtype == states[0][name].dtype == torch.float32
            assert torch.equal(tensor, expected), name
            exact = sum(wi * s[name].double() for wi, s in zip(w, states))
            assert torch.allclose(tensor.double(), exact, rtol=0, atol=1e-6), name
        config = json.loads((out / "config.json").read_text())
        assert config["warm"]["members"] == folders and config["warm"]["weights"] == w
        assert 0.5 < config["warm"]["head_cosine_min"] <= 1  # one head init, moved a little: the heads agree
        assert config["reward_start"] == json.loads((members["m1"] / "config.json").read_text())["reward_start"]
        card = (out / "README.md").read_text()
        assert all(f"`{f}`" in card for f in folders) and "WARM" in card
        rewards = _rewards(out)  # a normal one-label reward model through the seam
        assert len(rewards) == 4 and all(abs(r) < 1e3 for r in rewards)
        assert rewards != pytest.approx(_rewards(members["m1"]), abs=1e-4)  # not a member


def test_a_model_averaged_with_itself_scores_as_itself(members, tmp_path):
    m1 = str(members["m1"])
    out = warm.average(warm.WarmConfig(members=[m1, m1], output_dir=str(tmp_path / "self")))
    got, alone = load_file(out / "model.safetensors"), load_file(members["m1"] / "model.safetensors")
    assert all(torch.equal(got[k], alone[k]) for k in alone)
    assert _rewards(out) == _rewards(members["m1"])


def test_refusals_name_the_setting_before_anything_is_written(members, tmp_path):
    m1, m2 = str(members["m1"]), str(members["m2"])
    out = tmp_path / "out"
    cases = [
        (dict(members=[m1]), "members: WARM averages E >= 2"),
        (dict(members=[m1, m2], weights=[0.7, 0.7]), "must sum to 1"),
        (dict(members=[m1, m2], weights=[1.5, -0.5]), "each must be >= 0"),
        (dict(members=[m1, m2], weights=[1.0]), "1 weights for 2 members"),
        (
            dict(members=[m1, str(members["other_start"])]),
            r"members\[1\]=.* another start than members\[0\] \(reward_start models",
        ),
        (dict(members=[m1, str(members["no_start"])]), r"members\[1\]=.* records no reward_start"),
        (
            dict(members=[m1, str(members["other_shape"])]),
            r"members\[1\]=.*: tensor model\.layers\.0\.mlp\.\w+\.weight is F32 \[\d+, \d+\], in members\[0\] F32",
        ),
        (dict(members=[m1, m2], output_dir=m1), "is one of the members"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(ValueError, match=fragment) as err:
            warm.average(warm.WarmConfig(**({"output_dir": str(out)} | kwargs)))
        assert "\n" not in str(err.value)
    assert not out.exists()
    # A member without the record is averaged when the user vouches for the start
    assert warm.average(warm.WarmConfig(members=[m1, str(members["no_start"])], output_dir=str(out),
                                        assume_same_start=True)) == out  # fmt: skip
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="is not empty .*--overwrite_output_dir true"):
        warm.average(warm.WarmConfig(members=[m1, m2], output_dir=str(out)))
    assert (out / "model.safetensors").read_bytes() == before  # nothing overwritten unasked
    warm.average(warm.WarmConfig(members=[m1, m2], output_dir=str(out), overwrite_output_dir=True))
    assert (out / "model.safetensors").read_bytes() != before


def test_the_recipe_refuses_in_one_line_and_the_config_parses(members, tmp_path):
    from trl import TrlParser

    (args,) = TrlParser((warm.WarmConfig,)).parse_args_and_config(
        ["--config", str(ROOT / "recipes" / "configs" / "tiny" / "warm_rm.yaml")]
    )
    assert len(args.members) == 5 and args.weights == [0.2] * 5 and args.output_dir
    cmd = [sys.executable, str(ROOT / "recipes" / "warm_rm.py"), "--output_dir", str(tmp_path / "o"), "--members"]
    proc = subprocess.run([*cmd, str(members["m1"]), str(members["other_start"])], capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hhrm: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "another start" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "o").exists()
