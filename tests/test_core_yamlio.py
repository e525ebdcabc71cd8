"""Reading user YAML (layerzo.core.yamlio): aliases refused, size capped, every failure one line."""

from __future__ import annotations

import pytest

from layerzo.core.yamlio import MAX_YAML_BYTES, NoAliasLoader, read_yaml
from layerzo.errors import ConfigError


def test_a_plain_document_loads(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps: 10\nlayers: [3, 7]\n")
    assert read_yaml(path, ConfigError, "recipe") == {"steps": 10, "layers": [3, 7]}


@pytest.mark.parametrize("text, match", [
    ("a: &x [1, 2]\nb: *x\n", "aliases"),  # a billion-laughs document starts like this
    ("[" * 5000 + "]" * 5000, "nests too deeply|not valid YAML"),
    ("a: [1, 2\n", "not valid YAML at line"),
])
def test_bad_documents_are_one_line_refusals(tmp_path, text, match):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        read_yaml(path, ConfigError, "recipe")
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_billion_laughs_document_is_refused_at_once(tmp_path):
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="aliases"):
        read_yaml(path, ConfigError, "recipe")


def test_size_cap_non_utf8_and_the_loader_contract(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("x: " + "a" * (MAX_YAML_BYTES + 1))
    with pytest.raises(ConfigError, match="is refused"):
        read_yaml(big, ConfigError, "recipe")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_yaml(binary, ConfigError, "recipe")
    with pytest.raises(TypeError):
        import yaml

        read_yaml(big, ConfigError, "recipe", loader=yaml.SafeLoader)
    assert issubclass(NoAliasLoader, object)


def test_a_tag_whose_value_cannot_be_built_is_a_refusal(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lr: !!float abc\n")
    with pytest.raises(ConfigError, match="not valid YAML \\(ValueError"):
        read_yaml(path, ConfigError, "recipe")


def test_flow_depth_counts_the_deepest_bracket_nesting():
    from layerzo.core.yamlio import MAX_FLOW_DEPTH, flow_depth

    assert flow_depth("a: [1, {b: [2]}]\n") == 3 and flow_depth("a: 1\n") == 0 and flow_depth("]]][") == 1
    assert flow_depth("[" * (MAX_FLOW_DEPTH + 1)) > MAX_FLOW_DEPTH
