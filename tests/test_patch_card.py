"""The model card written beside every patch: Hub front matter, results, recipe, how to apply."""

from __future__ import annotations

import dataclasses
import re

import yaml

from layerzo.patch.card import build_model_card
from layerzo.patch.manifest import CARD_NAME, MANIFEST_NAME, TRAJECTORY_NAME, WEIGHTS_NAME
from patch_helpers import make_patch
from test_patch_format import STEPS, model, saved  # noqa: F401  (model, saved: the same fixtures)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---")[1])


def test_model_card_front_matter_and_body(saved):
    text = (saved / CARD_NAME).read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == "tiny/llama"
    assert front["base_model_relation"] == "adapter"
    assert {"layerzo", "zeroth-order"} <= set(front["tags"])
    assert front["library_name"] == "layerzo"
    assert "| patched.accuracy | 0.6250 |" in text
    assert "layerzo apply tiny/llama" in text and "layerzo.load(" in text
    assert "**2**" in text  # dominant layer


def test_card_names_the_layers_steps_recipe_and_files(model):
    manifest = make_patch(model, 2).manifest
    card = build_model_card(manifest, recorded_steps=7)
    intro = next(line for line in card.splitlines() if line.startswith("A layers patch"))
    assert "decoder layer(s) 2 of tiny/llama (LlamaForCausalLM, 4 layers)" in intro
    assert re.search(r"\b7\b[^.]*steps", intro)  # the recorded trajectory length
    assert "LlamaForCausalLM" in front_matter(card)["tags"]
    recipe = card.split("## Recipe")[1].split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(recipe) == manifest.recipe
    for name in (WEIGHTS_NAME, MANIFEST_NAME, TRAJECTORY_NAME):
        assert f"`{name}`" in card


def test_card_without_profile_metrics_or_revision(model):
    manifest = dataclasses.replace(make_patch(model, 1).manifest, profile=None, metrics={})
    card = build_model_card(manifest, 0)
    assert "Dominant layer" not in card
    assert "| (none recorded) | |" in card
    assert "base_model_revision" not in front_matter(card)


def test_card_pins_the_base_revision_and_formats_nested_metrics(model):
    manifest = dataclasses.replace(make_patch(model, 1).manifest, base_revision="abc123",
                                   metrics={"dev": {"acc": 0.5, "n": 8}, "steps": 3})
    card = build_model_card(manifest, 3)
    assert front_matter(card)["base_model_revision"] == "abc123"
    assert "| dev.acc | 0.5000 |" in card and "| dev.n | 8 |" in card and "| steps | 3 |" in card


def test_card_says_how_the_layer_was_chosen(model):
    """The outlier rule's pick, the sensitivity rule's and auto's race each get their sentence, with the reason."""
    base = make_patch(model, 1).manifest
    outlier = {"pick": {"layer": 1, "confidence": "high", "reason": "layer 1 is the first outlier layer"}}
    auto = {"selection": "auto", "dominant_layer": 3, "reason": "layer 3 (last layer) won a race of 4 candidates"}
    sens = {"selection": "sensitivity", "dominant_layer": 2, "reason": "its perturbation changes the final state most"}
    for profile, text in ((outlier, "found by `layerzo profile`: **1**. layer 1 is the first outlier layer."),
                          (auto, "Layer chosen by `--layers auto` (a race of candidate layers on the task): **3**. "
                                 "layer 3 (last layer) won a race of 4 candidates."),
                          (sens, "`--layers dominant --select sensitivity` (the ZO sensitivity profile): **2**.")):
        assert text in build_model_card(dataclasses.replace(base, profile=profile), 1)
