"""ZO sensitivity profile of every layer vs the activation profile, on the demo model and SST-2.

    python benchmarks/bench_sensitivity.py --data-dir ../shared/data [--directions 8 --batches 2 --batch-size 8]

Times ``profile_model`` (activation outliers, 8 training inputs) and ``task_sensitivity``
(K directions × B batches per layer, the task's loss, prefix cache) in one process, and writes the
per-layer table, the outlier pick, the sensitivity pick and the Spearman correlation of
the sensitivity ranking with layer depth to benchmarks/results/sensitivity_sst2_smollm2.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import RESULTS, header, stamp, write_report

from layerzo.core.atomic import atomic_write_text
from layerzo.core.stats import spearman


def render(result: dict, report, args, stem: str = "sensitivity_sst2_smollm2") -> str:
    """The Markdown report (also re-made from the JSON by --rerank after a change of the pick rule)."""
    outlier = result["outlier_pick"]
    rows = ["| layer | grad/weight | grad norm | stability | own Δ | final Δ | growth | loss Δ |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in report.layers:
        mark = " (outlier pick)" if s.layer == outlier else ""
        mark += " (sensitivity pick)" if s.layer == report.pick else ""
        rows.append(f"| {s.layer}{mark} | {s.grad_per_weight:.3g} | {s.grad_rms:.3g} | {s.stability:.2f} | "
                    f"{s.own_change:.2e} | {s.final_change:.2e} | {s.growth:.2f} | {s.loss_change:.2e} |")
    return header("ZO sensitivity profile: demo model, SST-2", result) + "\n".join([
        f"K = {args.directions} directions × {args.batches} batches of {args.batch_size}, eps 1e-3, "
        + ("one-sided, " if report.config.one_sided else "") + 
        f"{report.forwards} forwards. Sensitivity profile {report.seconds:.1f} s"
        + (f" = {result['cost_in_plain_forwards']:.0f}x its own plain forward of the same batches (one shared by "
           f"all layers; the work is {report.forward_equivalents:.0f} forward-equivalents per batch)"
           if result.get("cost_in_plain_forwards") else "") + " = "
        f"{result['ratio_to_activation_profile']:.1f}× the activation profile's forward "
        f"({result['activation_profile_seconds']:.2f} s), {result['ratio_to_profile_command']:.2f}× a whole "
        f"`layerzo profile` (model load {result['load_seconds']:.1f} s + forward).", "",
        *([f"Why it costs this much: per example the profile runs {result['forward_equivalents_per_example']:.0f} "
           "forward-equivalents (one plain forward shared by all layers, then K (one-sided) or 2K (central) "
           "perturbed forwards per layer, each from that layer up) against the activation profile's one, and on "
           "this CPU a forward is compute-bound (the demo's time per row is flat from 8 to 128 rows a batch), so "
           "batching cannot buy it back: the profile's time is set by the examples it measures. Within 3× a whole "
           "`layerzo profile` fits K = 8 one-sided on 2 batches of 2 "
           "([sensitivity_fast_sst2_smollm2.md](sensitivity_fast_sst2_smollm2.md): the same pick, Spearman +0.97 "
           "with these final-state changes); `--layers auto` uses a smaller screen (K = 2 one-sided, 4 examples)."]
          if "forward_equivalents_per_example" in result and result["ratio_to_profile_command"] > 3 else []), "",
        f"Outlier pick: layer {outlier} (rank {result['outlier_pick_sensitivity_rank']} in the sensitivity "
        f"ranking). Sensitivity pick: layer {report.pick} — {report.reason}. Largest gradient per weight: layer "
        f"{result['largest_grad_per_weight']}. Spearman(gradient per weight, earliness) = "
        f"{result['spearman_sensitivity_vs_depth']:.2f}.", "", *rows, "",
        *([f"`layerzo profile --sensitivity` would take {result['command_ratio']:.2f}× `layerzo profile` (load + "
           f"activation forward + this profile, over load + activation forward)."] if "command_ratio" in result else []),
        *(f"Against the reference `{a['reference']}` ({a['reference_seconds']:.0f} s): same pick: {a['same_pick']} "
          f"(its pick, layer {a['reference_pick']}, ranks {a['reference_pick_rank']} here); Spearman over the layers "
          f"of the final-state change {a['spearman_final_change']:+.2f}, of the gradient per weight "
          f"{a['spearman_grad_per_weight']:+.2f}." for a in [result.get("agreement")] if a), "",
        f"![sensitivity]({stem}.png)", "",
        *([f"The pick was re-applied to these measurements with `--rerank` ({result['reranked']})."]
          if result.get("reranked") else [])])


def agreement(report, reference: dict, where: str) -> dict:
    """This run's picks and per-layer scores against a reference report of the same model and task."""
    ref = {d["layer"]: d for d in reference["sensitivity"]["layers"]}
    layers = [s.layer for s in report.layers]
    return {"reference": where, "reference_pick": reference["sensitivity_pick"], "same_pick":
            report.pick == reference["sensitivity_pick"],
            "reference_pick_rank": report.ranking().index(reference["sensitivity_pick"]) + 1,
            "spearman_final_change": spearman([s.final_change for s in report.layers],
                                              [ref[i]["final_change"] for i in layers]),
            "spearman_grad_per_weight": spearman([s.grad_per_weight for s in report.layers],
                                                 [ref[i]["grad_per_weight"] for i in layers]),
            "reference_seconds": reference["sensitivity_seconds"]}


def saved(path, pick_rule: bool = False):
    """A saved report's result, :class:`SensitivityReport` and render arguments (``pick_rule``: the pick re-made
    by today's rule)."""
    from types import SimpleNamespace

    from layerzo.zo.sensitivity import LayerSensitivity, SensitivityConfig, SensitivityReport, pick_by_sensitivity

    result = json.loads(Path(path).read_text())
    doc = result["sensitivity"]
    layers = tuple(LayerSensitivity(**{k: (float("inf") if v is None else v) for k, v in d.items()})
                   for d in doc["layers"])
    pick, reason = pick_by_sensitivity(layers) if pick_rule else (doc["pick"], doc["reason"])
    report = SensitivityReport(doc["model"], SensitivityConfig(**doc["config"]), doc["num_batches"], layers, pick,
                               reason, doc["seconds"], doc["forwards"], doc.get("plain_seconds", 0.0),
                               doc.get("forward_equivalents", 0.0))
    args = SimpleNamespace(directions=report.config.directions, batches=report.num_batches,
                           batch_size=result.get("batch_size", 8))
    return result, report, args


def render_saved(stem: str) -> None:
    """Re-write ``<stem>.md`` from its JSON (after a change of the report's text; no numbers change)."""
    result, report, args = saved(RESULTS / f"{stem}.json")
    atomic_write_text(RESULTS / f"{stem}.md", render(result, report, args, stem) + "\n")


def rerank(path) -> None:
    """Apply the current pick rule to a saved report (the per-layer numbers do not change)."""
    from layerzo.zo.sensitivity import plot_sensitivity

    result, report, args = saved(path, pick_rule=True)
    result.update(reranked="python benchmarks/bench_sensitivity.py --rerank, after the pick rule changed from the "
                           "largest gradient per weight to the largest change of the final hidden state",
                  sensitivity=report.to_dict(), sensitivity_pick=report.pick, sensitivity_reason=report.reason,
                  outlier_pick_sensitivity_rank=report.ranking().index(result["outlier_pick"]) + 1,
                  largest_grad_per_weight=max(report.layers, key=lambda s: s.grad_per_weight).layer)
    plot_sensitivity(report, RESULTS / "sensitivity_sst2_smollm2.png")
    write_report("sensitivity_sst2_smollm2", result, render(result, report, args))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--directions", type=int, default=8)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--one-sided", action="store_true", help="one-sided differences: K forwards a layer instead of 2K")
    p.add_argument("--stem", default="sensitivity_sst2_smollm2", help="report name under benchmarks/results/")
    p.add_argument("--reference", help="a saved report of this script (e.g. the K = 8, 2 x 8 central one): how far "
                                       "this run's ranking agrees with it")
    p.add_argument("--rerank", action="store_true", help="re-apply the pick rule to the saved report, no run")
    p.add_argument("--render", action="store_true", help="re-write --stem's Markdown from its JSON, no run")
    args = p.parse_args()
    if args.render:
        render_saved(args.stem)
        return
    if args.rerank:
        rerank(RESULTS / "sensitivity_sst2_smollm2.json")
        return
    from layerzo.data.tasks import calibration_texts
    from layerzo.model.loading import load_model
    from layerzo.profile.rule import ProfileConfig
    from layerzo.profile.run import profile_model
    from layerzo.tune.select import task_sensitivity
    from layerzo.zo.sensitivity import SensitivityConfig, plot_sensitivity

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    loaded = load_model(None)
    load_seconds = time.perf_counter() - t0
    texts = calibration_texts("sst2", args.data_dir, n=ProfileConfig().num_sequences, seed=0)
    t0 = time.perf_counter()
    activation = profile_model(loaded.model, loaded.tokenizer, texts, ProfileConfig(), loaded.layout,
                               model_name=loaded.source.name)
    activation_seconds = time.perf_counter() - t0
    report = task_sensitivity(loaded, "sst2", args.data_dir,
                              config=SensitivityConfig(directions=args.directions, one_sided=args.one_sided),
                              num_batches=args.batches, batch_size=args.batch_size)
    doc = report.to_dict()
    gpw = [s.grad_per_weight for s in report.layers]
    result = stamp({
        "load_seconds": round(load_seconds, 2), "activation_profile_seconds": round(activation_seconds, 3),
        "sensitivity_seconds": report.seconds, "ratio_to_activation_profile": report.seconds / activation_seconds,
        "ratio_to_profile_command": report.seconds / (load_seconds + activation_seconds),
        "outlier_pick": activation.pick.layer, "sensitivity_pick": report.pick, "sensitivity_reason": report.reason,
        "outlier_pick_sensitivity_rank": report.ranking().index(activation.pick.layer) + 1,
        "largest_grad_per_weight": max(report.layers, key=lambda s: s.grad_per_weight).layer,
        "batch_size": args.batch_size, "cost_in_plain_forwards": report.cost_in_forwards,
        "forward_equivalents_per_example": report.forward_equivalents,
        "spearman_sensitivity_vs_depth": spearman(gpw, [float(-i) for i in range(len(gpw))]),
        # what a user waits for: `layerzo profile --sensitivity` over `layerzo profile` (both load the model)
        "command_ratio": (load_seconds + activation_seconds + report.seconds) / (load_seconds + activation_seconds),
        "sensitivity": doc})
    if args.reference:
        result["agreement"] = agreement(report, json.loads(Path(args.reference).read_text()), args.reference)
    plot_sensitivity(report, RESULTS / f"{args.stem}.png")
    md = render(result, report, args, args.stem)
    write_report(args.stem, result, md)
    print(md)


if __name__ == "__main__":
    main()
