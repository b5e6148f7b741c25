"""Recipes (the expert settings), the command line's option surface, and how errors name settings."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from repapq_deploy.cli import METHODS, STAGES, TENSORRT, _options, build, cli_name, main
from repapq_deploy.errors import ConfigError, DeployError, InputError
from repapq_deploy.recipe import Recipe, named_recipes


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_recipe_round_trips(tmp_path: Path, suffix: str) -> None:
    recipe = Recipe(preset="fast", offset_relu="all", calib_augment=("hflip",), qdrop=0.5,
                    reconstruction={"lr_weight": 0.0, "iters": 50})
    first = tmp_path / f"a{suffix}"
    recipe.save(first)
    loaded = Recipe.load(first)
    assert loaded == recipe
    second = tmp_path / f"b{suffix}"
    loaded.save(second)
    assert Recipe.load(second) == recipe
    assert first.read_text() == second.read_text()


def test_saved_recipe_names_only_what_changed(tmp_path: Path) -> None:
    Recipe(split_identity=False).save(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"split_identity": False}


@pytest.mark.parametrize(("content", "key"), [
    ("presett: fast\n", "presett"),
    ("preset: quick\n", "preset"),
    ("qdrop: 1.5\n", "qdrop"),
    ("add_bits: '8'\n", "add_bits"),
    ("split_identity: 3\n", "split_identity"),
    ("calib_augment: [flip]\n", "calib_augment"),
    ("reconstruction: {iterations: 5}\n", "iterations"),
    ("reconstruction: {iters: many}\n", "reconstruction.iters"),
    ("opset: 11\n", "opset"),
])
def test_bad_recipe_is_one_line_naming_the_key(tmp_path: Path, content: str, key: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        Recipe.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and f"'{key}'" in message


def test_unreadable_recipe_file(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("preset: [unclosed\n")
    with pytest.raises(InputError, match="not readable as YAML"):
        Recipe.load(tmp_path / "r.yaml")
    with pytest.raises(InputError, match="not found"):
        Recipe.load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="no such named recipe"):
        Recipe.load("no-such-recipe")


def test_named_recipes_load() -> None:
    assert {"fast", "thorough"} <= set(named_recipes())
    for name in named_recipes():
        assert Recipe.load(name) != Recipe() or name == "default"
    assert Recipe.load("fast").preset == "fast"


def test_reconstruction_overrides_combine_named_and_free_keys() -> None:
    r = Recipe(adaround=True, calib_augment=("hflip",), reconstruction={"iters": 3})
    assert r.reconstruction_overrides() == {"adaround": True, "augment": ("hflip",), "iters": 3}


def _options_in_help(command: click.Command) -> dict[str, int]:
    ctx = click.Context(command)
    counts: dict[str, int] = {}
    for p in command.get_params(ctx):
        if isinstance(p, click.Option) and not p.hidden and "--help" not in p.opts:
            group = getattr(p, "group", None) or "main"
            counts[group] = counts.get(group, 0) + 1
    return counts


def test_build_help_lists_at_most_twenty_user_options() -> None:
    counts = _options_in_help(build)
    assert counts["main"] <= 20, counts
    assert counts[TENSORRT] == 5
    result = CliRunner().invoke(main, ["build", "--help"])
    assert result.exit_code == 0
    assert "TensorRT builder options:" in result.output
    for knob in ("--offset-relu", "--split-identity", "--equalize", "--add-bits", "--adaround", "--qdrop",
                 "--gptq", "--calib-augment", "--preset", "--bench-seconds"):
        assert knob not in result.output


def test_every_stage_command_shares_the_build_options() -> None:
    names = {p.name for p in build.params}
    for stage in STAGES:
        assert {p.name for p in main.commands[stage].params} == names


def test_cli_constants_match_the_library() -> None:
    from repapq_deploy.calibrate.registry import all_methods
    from repapq_deploy.pipeline import STAGES as PIPELINE_STAGES

    assert set(METHODS) == {"auto", *all_methods()} and STAGES == PIPELINE_STAGES


def _parsed(*args: str) -> dict:
    ctx = build.make_context("build", ["model.pt", *args])
    kwargs = dict(ctx.params)
    kwargs.pop("as_json")
    return kwargs


def test_earlier_flags_still_set_the_recipe() -> None:
    opts = _options(_parsed("--offset-relu", "all", "--no-split-identity", "--preset", "fast", "--eval-count", "200",
                            "--bench-seconds", "0.2", "--calib-augment", "hflip,shift", "--add-bits", "6",
                            "--mean", "0.5", "--std", "0.25"))
    r = opts.recipe
    assert (r.offset_relu, r.split_identity, r.preset) == ("all", False, "fast")
    assert (r.eval_count, r.bench_seconds) == (200, 0.2)
    assert r.calib_augment == ("hflip", "shift") and r.add_bits == 6
    assert opts.mean == (0.5,) and opts.std == (0.25,)


def test_recipe_file_and_flags_combine(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("preset: thorough\nopset: 18\n")
    opts = _options(_parsed("--recipe", str(tmp_path / "r.yaml"), "--normalize", "0.1,0.2,0.3/1,2,3"))
    assert (opts.recipe.preset, opts.recipe.opset) == ("thorough", 18)
    assert opts.mean == (0.1, 0.2, 0.3) and opts.std == (1.0, 2.0, 3.0)


def test_cli_recipe_error_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("offset_relu: sometimes\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", "model.pt", "--recipe", str(tmp_path / "r.yaml"), "--out", str(out)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "'offset_relu'" in lines[0] and "sometimes" in lines[0], result.output
    assert not out.exists()


def test_errors_name_settings_in_each_surface() -> None:
    exc = DeployError("`calib` data.npz: not found; pass `offset_relu` none or check `in_chans`")
    assert str(exc) == "calib data.npz: not found; pass offset_relu none or check in_chans"
    assert exc.render(cli_name) == ("--calib data.npz: not found; pass recipe key offset_relu none or check "
                                    "--input-size")
