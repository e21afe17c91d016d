"""Recipes and their configs: every YAML parses with its stage's config, CLI overrides win, the layout holds."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from trl import ModelConfig, TrlParser

from hhrm import data, sft
from hhrm.raft import RaftConfig
from hhrm.rm import stage as rm

ROOT = Path(__file__).resolve().parents[1]
TINY_SFT = ROOT / "recipes" / "configs" / "tiny" / "sft.yaml"


def test_yaml_config_and_cli_overrides():
    parser = TrlParser((data.DataArguments, sft.SFTConfig, ModelConfig))
    d, a, m = parser.parse_args_and_config(
        ["--config", str(TINY_SFT), "--learning_rate", "0.01", "--test_offset", "7", "--packing_strategy", "bfd"]
    )
    cfg = yaml.safe_load(TINY_SFT.read_text())
    assert m.model_name_or_path == cfg["model_name_or_path"] and d.dataset_name == cfg["dataset_name"]
    assert a.learning_rate == 0.01 and d.test_offset == 7 and a.packing_strategy == "bfd"
    assert a.num_train_epochs == cfg["num_train_epochs"] and a.max_length == cfg["max_length"]
    with pytest.raises(ValueError, match="dataset_format"):
        parser.parse_args_and_config(["--config", str(TINY_SFT), "--dataset_format", "xml"])


def _stage_config(stage: str):
    # <stage>.yaml or <stage>_<variant>.yaml (raft_dpo.yaml: the RAFT recipe with update: dpo)
    return {"sft": sft.SFTConfig, "rm": rm.RewardConfig, "raft": RaftConfig}[stage.split("_")[0]]


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (ROOT / "recipes").glob("*.py")))
def test_every_recipes_help_renders(recipe):
    """``python recipes/<name>.py --help`` formats every setting's help: argparse %-formats it, so a bare "%" in a
    help text makes --help crash (it did: "+50%"). In-process, with the configs the recipe's TrlParser names."""
    from conftest import load_recipe

    names = dict(vars(load_recipe(recipe)))
    tree = ast.parse((ROOT / "recipes" / f"{recipe}.py").read_text())
    for node in ast.walk(tree):  # the imports under `if __name__ == "__main__":` too (serve_rm's)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            exec(compile(ast.Module([node], []), recipe, "exec"), names)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "TrlParser"]
    assert calls, f"recipes/{recipe}.py builds no TrlParser"
    for call in calls:
        configs = eval(compile(ast.Expression(call.args[0]), recipe, "eval"), names)  # the tuple it names
        assert TrlParser(configs).format_help().count("\n  --") > 3


@pytest.mark.parametrize(
    "path", sorted((ROOT / "recipes" / "configs").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_every_recipe_yaml_parses_with_its_stage_config(path):
    """Each YAML parses exactly as its recipe parses it (unknown keys and bad values fail here)."""
    if path.stem.startswith("warm"):  # WARM (recipes/warm_rm.py) averages RM folders: no data, no start model
        from hhrm.rm import warm

        (args,) = TrlParser((warm.WarmConfig,)).parse_args_and_config(["--config", str(path)])
        assert len(args.members) >= 2 and args.output_dir
        return
    d, a, m = TrlParser((data.DataArguments, _stage_config(path.stem), ModelConfig)).parse_args_and_config(
        ["--config", str(path)]
    )
    assert m.model_name_or_path and d.dataset_name and a.output_dir


@pytest.mark.parametrize("path", sorted((ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1 and cfg.distributed_type is not None


# --------------------------------------------------------------------------------------------
# The library's layout: no import cycle, no stage importing a later one, modules of a readable size

SRC = ROOT / "src"
STAGE_ORDER = {
    "hhrm.sft": 1,
    "hhrm.rm": 2,
    "hhrm.raft": 3,
    "hhrm.overopt": 3,
    "hhrm.compare": 3,
}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def _import_graph() -> dict[str, set[str]]:
    """``module -> hhrm modules it imports`` (``from a import b`` counts ``a`` and, if a module, ``a.b``)."""
    trees = {_module_name(p): ast.parse(p.read_text()) for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, tree in trees.items():
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in trees and d != name}
    return graph


def _stage(module: str) -> int:
    return next(
        (rank for prefix, rank in STAGE_ORDER.items() if module == prefix or module.startswith(prefix + ".")), 0
    )


def test_no_import_cycle():
    graph = _import_graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path[path.index(d) :] + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_module_imports_a_later_stage():
    """Foundation modules import no stage; a stage imports only earlier stages (sft < rm < raft)."""
    graph = _import_graph()
    bad = [
        f"{m} imports {d}"
        for m, deps in graph.items()
        for d in deps
        if _stage(d) and (not _stage(m) or _stage(d) > _stage(m))
    ]
    assert not bad, bad


def test_modules_and_functions_stay_readable():
    """No library module over 400 lines, no function over 60, and the RAFT loop class under 300."""
    too_long = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > 400:
            too_long.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            size = node.end_lineno - node.lineno + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > 60:
                too_long.append(f"{path.name}:{node.name}: {size} lines")
            if isinstance(node, ast.ClassDef) and node.name == "RaftRunner" and size > 300:
                too_long.append(f"RaftRunner: {size} lines")
    assert not too_long, too_long


def _trl_internals() -> set[tuple[str, str]]:
    """``(module, name)`` of every ``from trl.<submodule> import <name>`` in hhrm and its recipes: what hhrm takes from
    outside TRL's top-level API, which TRL moves between releases."""
    found = set()
    for path in [*(SRC / "hhrm").rglob("*.py"), *(ROOT / "recipes").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trl."):
                found |= {(node.module, alias.name) for alias in node.names}
    return found


def test_the_trl_internals_hhrm_uses_are_where_it_imports_them_from():
    """A TRL upgrade that moves one of them fails here, naming it, rather than deep inside a run (vLLM generation,
    ZeRO-3 unwrapping and the reward model's load are each only reached by some runs)."""
    import importlib

    internals = _trl_internals()
    expected = {"VLLMGeneration", "DistributedBackend", "unwrap_model_for_generation", "suppress_seqcls_warning"}
    assert expected <= {name for _, name in internals}, internals
    missing = []
    for module, name in sorted(internals):
        try:
            if not hasattr(importlib.import_module(module), name):
                missing.append(f"{module}.{name}")
        except ImportError as err:
            missing.append(f"{module}.{name} ({err})")
    assert not missing, f"TRL no longer has these where hhrm imports them: {missing}"
