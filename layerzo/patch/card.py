"""The model card (README.md) written beside every layer patch.

Hub front matter marks the patch as an adapter of its base model, so the Hub
links the two; the body gives results, the recipe, the dominant layer, and how
to apply the patch from the CLI and from Python.
"""

from __future__ import annotations

from typing import Any, Mapping

from layerzo.patch.manifest import MANIFEST_NAME, TRAJECTORY_NAME, WEIGHTS_NAME, PatchManifest


def build_model_card(m: PatchManifest, recorded_steps: int) -> str:
    """README.md with Hub front matter, a results table, the recipe and how to apply the patch."""
    import yaml

    front = {
        "base_model": m.base_model,
        "base_model_relation": "adapter",
        "library_name": "layerzo",
        "tags": ["layerzo", "zeroth-order", "mezo", "layer-patch", m.architecture],
    }
    if m.base_revision:
        front["base_model_revision"] = m.base_revision
    layers = ", ".join(map(str, m.layers))
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# layerzo layer patch for {m.base_model}", "",
             f"A {m.kind} patch of decoder layer(s) {layers} of {m.base_model} ({m.architecture}, "
             f"{m.num_layers} layers), tuned with zeroth-order (MeZO / SPSA) optimisation on that layer only. "
             f"{training_summary(m.metrics, recorded_steps)} Made with layerzo {m.layerzo_version}.", ""]
    if m.metrics.get("no_op"):
        lines += ["> **Warning: this patch equals its base model.** No kept step changed the weights "
                  f"(kept: {m.metrics.get('kept', 'best')} weights, step {m.metrics.get('best_step')}); "
                  "`layerzo apply --replay` rebuilds the base itself.", ""]
    lines += selection_lines(m.profile or {})
    search = m.metrics.get("lr_search")
    if isinstance(search, Mapping) and "lr" in search:
        lines += [f"Learning rate chosen by `--lr auto`: **{search['lr']}**. {str(search.get('reason', '')).rstrip('.')}.",
                  ""]
    lines += ["## Results", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(_flatten(m.metrics).items())] or ["| (none recorded) | |"]
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(m.recipe, sort_keys=True).strip() or "{}", "```", "",
              "## How to apply", "", "Command line (writes a full Hugging Face checkpoint):", "", "```bash",
              f"layerzo apply {m.base_model} <this-repo-or-folder> -o patched-model", "```", "",
              "Python (patch applied in memory; the base fingerprint is checked first):", "", "```python",
              "import layerzo", f'model, tokenizer = layerzo.load("{m.base_model}", "<this-repo-or-folder>")', "```", "",
              f"Files: `{WEIGHTS_NAME}` (layer tensors only), `{MANIFEST_NAME}` (manifest, base fingerprint), "
              f"`{TRAJECTORY_NAME}` (ZO seeds and projected gradients; `layerzo apply --replay` rebuilds the "
              f"tensors from them).", ""]
    return "\n".join(lines)


def selection_lines(profile: Mapping[str, Any]) -> list[str]:
    """How the tuned layer was chosen, from the manifest's ``profile`` (nothing for an explicit ``--layers``)."""
    how = {"auto": "`--layers auto` (a race of candidate layers on the task)",
           "sensitivity": "`--layers dominant --select sensitivity` (the ZO sensitivity profile)"}
    if profile.get("selection") in how:
        return [f"Layer chosen by {how[profile['selection']]}: **{profile.get('dominant_layer')}**. "
                f"{str(profile.get('reason', '')).rstrip('.')}.", ""]
    pick = profile.get("pick")
    if isinstance(pick, Mapping) and "layer" in pick:
        return [f"Dominant layer (first massive-activation layer) found by `layerzo profile`: **{pick['layer']}**. "
                f"{str(pick.get('reason', '')).rstrip('.')}.", ""]
    if profile.get("dominant_layer") is not None:  # a profile recorded as the pick alone
        return [f"Dominant layer (first massive-activation layer) found by `layerzo profile`: "
                f"**{profile['dominant_layer']}**.", ""]
    return []


def training_summary(metrics: Mapping[str, Any], recorded_steps: int) -> str:
    """One sentence that agrees with the manifest: steps run, applied, kept, and what the trajectory rebuilds."""
    steps, applied = metrics.get("steps"), metrics.get("applied_steps")
    if steps is None:
        return f"Its trajectory holds {recorded_steps} applied steps."
    kept = "the final" if metrics.get("kept") == "last" else "the best-dev"
    return (f"Trained {steps} ZO steps ({applied} applied); the patch holds {kept} weights, after step "
            f"{metrics.get('best_step')}, which its trajectory of {recorded_steps} applied steps rebuilds from the base.")


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
