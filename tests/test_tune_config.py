"""Recipes: YAML keys map one to one onto TuneConfig fields; options override recipes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from layerzo.errors import ConfigError
from layerzo.tune.config import build_config, dump_recipe, load_recipe, recipe_fields, validate_recipe
from layerzo.tune.config import TuneConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_recipe_fields_are_the_config_fields_with_the_zo_fields_in_place():
    from layerzo.zo.engine import ZOConfig

    own = [f.name for f in dataclasses.fields(TuneConfig)]
    zo = [f.name for f in dataclasses.fields(ZOConfig)]
    at = own.index("zo")
    assert recipe_fields() == tuple(own[:at] + zo + own[at + 1:])
    # each field is defined once: a ZO key is not also a TuneConfig field
    assert not set(zo) & set(own)


def test_flat_dict_round_trips_and_replace_changes_one_key():
    config = TuneConfig.from_dict({"lr": 3e-4, "steps": 7, "momentum": 0.5, "layers": "2"})
    assert config.zo.lr == 3e-4 and config.zo.momentum == 0.5 and config.steps == 7
    assert TuneConfig.from_dict(config.to_dict()) == config
    assert list(config.to_dict()) == list(recipe_fields())
    assert config.replace(eps=1e-2).zo.eps == 1e-2 and config.replace(eps=1e-2).zo.lr == 3e-4
    with pytest.raises(ConfigError, match="unknown config key 'lrr'") as info:
        TuneConfig.from_dict({"lrr": 1.0})
    assert "'lr'" in info.value.one_line()
    with pytest.raises(ConfigError, match="momentum"):
        TuneConfig.from_dict({"momentum": 1.5})


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load_into_a_config(path):
    data = load_recipe(path)
    config = build_config(data)
    assert config.layers == "dominant" and config.task in ("sst2", "squad")
    flat = config.to_dict()
    for key, value in data.items():
        assert flat[key] == value


def test_shipped_recipes_cover_the_three_models():
    assert {p.name for p in RECIPES} >= {"smollm2-135m.yaml", "llama2-7b.yaml", "qwen3-8b.yaml"}


def test_unknown_key_is_refused_with_a_suggestion(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stepz: 10\n")
    with pytest.raises(ConfigError, match="unknown key 'stepz'") as info:
        load_recipe(path)
    assert "steps" in info.value.one_line()


def test_loose_yaml_values_are_coerced(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lr: 1e-4\nlayers: [7, 3]\nsteps: 20.0\nmax_abs_grad: null\n")
    data = load_recipe(path)
    assert data == {"lr": 1e-4, "layers": "7,3", "steps": 20, "max_abs_grad": None}
    assert build_config(data).layers == "7,3"


@pytest.mark.parametrize("data, match", [({"lora": "yes"}, "lora"), ({"steps": 1.5}, "steps"),
                                         ({"lr": "fast"}, "lr"), ({"task": None}, "task"),
                                         ({"lr": True}, "lr")])
def test_bad_values_are_named(data, match):
    with pytest.raises(ConfigError, match=match):
        validate_recipe(data)


def test_options_override_recipe_override_defaults():
    config = build_config({"steps": 50, "lr": 1e-3}, {"steps": 7, "eps": None})
    assert (config.steps, config.zo.lr, config.zo.eps) == (7, 1e-3, TuneConfig().zo.eps)


def test_dump_and_load_round_trip(tmp_path):
    config = TuneConfig.from_dict(dict(steps=12, lr=3e-4, layers="3,7", lora=True, model="org/name", max_abs_grad=None))
    path = dump_recipe(config, tmp_path / "sub" / "r.yaml")
    assert build_config(load_recipe(path)) == config
    assert not list(path.parent.glob(".*tmp"))


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(listy)


def test_a_bare_name_loads_the_shipped_recipe_and_a_wrong_one_lists_them(tmp_path, monkeypatch):
    from layerzo.tune.config import shipped_recipe_names

    monkeypatch.chdir(tmp_path)  # no recipes/ folder here: the name must resolve inside the package
    assert load_recipe("smollm2-135m") == load_recipe(ROOT / "recipes" / "smollm2-135m.yaml")
    assert load_recipe("qwen3-8b.yaml")["lr"] == load_recipe(ROOT / "recipes" / "qwen3-8b.yaml")["lr"]
    assert set(shipped_recipe_names()) == {p.stem for p in RECIPES}
    with pytest.raises(ConfigError, match="does not exist") as exc:
        load_recipe("smollm2-135")
    assert "smollm2-135m" in exc.value.one_line()  # the hint names the shipped recipes


def test_every_file_under_recipes_is_shipped_as_package_data():
    import fnmatch
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"]["layerzo.recipe_files"] == "recipes"
    globs = {pkg.removeprefix("layerzo.recipe_files").lstrip(".").replace(".", "/"): pats
             for pkg, pats in config["package-data"].items() if pkg.startswith("layerzo.recipe_files")}
    for f in (ROOT / "recipes").rglob("*"):
        if f.is_file() and "__pycache__" not in f.parts and f.name != "__init__.py":
            rel = f.relative_to(ROOT / "recipes")
            folder = "" if rel.parent == Path(".") else rel.parent.as_posix()
            assert any(fnmatch.fnmatch(rel.name, g) for g in globs.get(folder, [])), f"{rel} is not package data"
            pkg = "layerzo.recipe_files" + ("." + folder.replace("/", ".") if folder else "")
            assert pkg in config["packages"], pkg


def test_integers_beyond_64_bits_are_refused():
    with pytest.raises(ConfigError, match="seed must be at most 9223372036854775807"):
        TuneConfig(seed=2**63)
    TuneConfig(seed=2**63 - 1)


def test_a_recipe_that_is_a_folder_or_not_utf8_is_one_line(tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_recipe(tmp_path / "folder.yaml")
    (tmp_path / "latin1.yaml").write_bytes("lr: 1e-3  # café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_recipe(tmp_path / "latin1.yaml")
