"""``layerzo tune``: ZO-tune the dominant (or given) layer and write a layer patch.

Every recipe option maps onto one flat :class:`layerzo.tune.config.TuneConfig` key
(the recipe keys); options left out fall back to ``--recipe``, then to the defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import JsonOpt, emit_json, err_console, handle_errors


def register(app: typer.Typer) -> None:
    """Add ``tune`` to the app."""
    app.command("tune")(tune)


def resume_command(ctx: typer.Context) -> str:
    """The command line of this ``tune`` invocation, rebuilt from its parsed options, plus ``--resume``."""
    import shlex

    words = ["layerzo", ctx.info_name or "tune"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not getattr(param, "opts", None) or value is None or param.name == "resume":
            continue
        if getattr(param, "is_flag", False):
            if param.secondary_opts:  # --x/--no-x given either way: keep it
                words.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                words.append(param.opts[0])
        else:
            words += [param.opts[0], str(value)]
    return shlex.join(words + ["--resume"])


def _opt(flag: str, help: str):
    return typer.Option(flag, help=help, show_default=False)


@handle_errors
def tune(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="Patch folder to write.")],
    recipe: Annotated[Optional[Path], _opt("--recipe", "Recipe YAML, or a shipped recipe by name (smollm2-135m, llama2-7b, qwen3-8b); options override it.")] = None,
    model: Annotated[Optional[str], _opt("--model", "Checkpoint dir, .gguf or Hub id (default: SmolLM2-135M demo).")] = None,
    revision: Annotated[Optional[str], _opt("--revision", "Hub revision of the model.")] = None,
    task: Annotated[Optional[str], _opt("--task", "Task name (sst2, rte, ..., squad, drop), a task YAML, or a prompt/completion or messages .jsonl. [default: sst2]")] = None,
    data_dir: Annotated[Optional[str], _opt("--data-dir", "Folder with <task>/{train,validation}.jsonl.")] = None,
    layers: Annotated[Optional[str], _opt("--layers", "5, 3,7, 0-3,11, -1 (the last layer), all, dominant (profile first), or auto (race the outlier pick and its near miss or runner-up, the sensitivity pick and runner-up, and the last layer on the task; tune the winner if its dev gain is > 2 SE, else the outlier pick). [default: dominant]")] = None,
    select: Annotated[Optional[str], _opt("--select", "How --layers dominant picks: outlier (first activation-outlier layer) or sensitivity (ZO sensitivity profile). [default: outlier]")] = None,
    lora: Annotated[Optional[bool], _opt("--lora/--no-lora", "LoRA-ZO on q/v of the selected layers. [default: no-lora]")] = None,
    lora_rank: Annotated[Optional[int], _opt("--lora-rank", "LoRA rank. [default: 8]")] = None,
    lora_alpha: Annotated[Optional[float], _opt("--lora-alpha", "LoRA alpha. [default: 16]")] = None,
    steps: Annotated[Optional[int], _opt("--steps", "ZO steps. [default: 1000]")] = None,
    batch_size: Annotated[Optional[int], _opt("--batch-size", "Examples per step. [default: 16]")] = None,
    objective: Annotated[Optional[str], _opt("--objective", "auto (choice for classification, ce for generative tasks), choice, ce (teacher-forced cross-entropy), or the non-differentiable accuracy, f1, em. [default: auto]")] = None,
    max_new_tokens: Annotated[Optional[int], _opt("--max-new-tokens", "Generative tasks: greedy answer length at most (dev/test, f1/em). [default: 50]")] = None,
    lr: Annotated[Optional[str], _opt("--lr", "Learning rate, or auto (= --lr-search auto). [default: 1e-4]")] = None,
    lr_search: Annotated[Optional[str], _opt("--lr-search", "Race learning rates on the training batches first and run with the winner: auto (a grid sized by the number of tuned weights), a comma list (1e-4,3e-4,1e-3), or off. [default: off]")] = None,
    eps: Annotated[Optional[float], _opt("--eps", "Perturbation scale. [default: 1e-3]")] = None,
    weight_decay: Annotated[Optional[float], _opt("--weight-decay", "Weight decay (not on norms/biases). [default: 0]")] = None,
    q: Annotated[Optional[int], _opt("--q", "Directions averaged per step. [default: 1]")] = None,
    momentum: Annotated[Optional[float], _opt("--momentum", "ZO-SGD momentum (0 = off). [default: 0]")] = None,
    lr_schedule: Annotated[Optional[str], _opt("--lr-schedule", "constant or linear. [default: constant]")] = None,
    max_abs_grad: Annotated[Optional[float], _opt("--max-abs-grad", "Reject a step if |g| exceeds this. [default: 1e4]")] = None,
    max_bad_steps: Annotated[Optional[int], _opt("--max-bad-steps", "Rejected steps in a row before giving up. [default: 5]")] = None,
    seed: Annotated[Optional[int], _opt("--seed", "Random seed (data split, batches, directions). [default: 0]")] = None,
    eval_every: Annotated[Optional[int], _opt("--eval-every", "Dev evaluation every N steps. [default: 100]")] = None,
    num_train: Annotated[Optional[int], _opt("--num-train", "Training examples. [default: 1000]")] = None,
    num_dev: Annotated[Optional[int], _opt("--num-dev", "Dev examples. [default: 500]")] = None,
    num_test: Annotated[Optional[int], _opt("--num-test", "Test examples. [default: 1000]")] = None,
    eval_batch_size: Annotated[Optional[int], _opt("--eval-batch-size", "Batch size for dev/test. [default: 16]")] = None,
    max_length: Annotated[Optional[int], _opt("--max-length", "Tokens per sequence at most. [default: 512]")] = None,
    dtype: Annotated[Optional[str], _opt("--dtype", "float32 or bfloat16 (frozen model precision). [default: float32]")] = None,
    device: Annotated[Optional[str], _opt("--device", "cpu, cuda, cuda:1, ... (torchrun: cuda → cuda:LOCAL_RANK) [default: cpu]")] = None,
    device_map: Annotated[
        Optional[str], _opt("--device-map", "Spread the frozen model: auto, balanced, sequential, or a JSON module→device map.")
    ] = None,
    shard_batch: Annotated[
        Optional[bool], _opt("--shard-batch/--no-shard-batch", "torchrun: each rank scores its 1/W of the batch. [default: no-shard-batch]")
    ] = None,
    trust_remote_code: Annotated[Optional[bool], _opt("--trust-remote-code/--no-trust-remote-code", "Allow checkpoint code. [default: no-trust-remote-code]")] = None,
    cache_lower_layers: Annotated[
        Optional[bool], _opt("--cache-lower-layers/--no-cache-lower-layers", "Run layers below the tuned one once per step. [default: cache-lower-layers]")
    ] = None,
    prefix_cache_gb: Annotated[
        Optional[float], _opt("--prefix-cache-gb", "GiB for the lower layers' per-example outputs, kept for the whole run (0: off; default: a quarter of the RAM, at most 8).")
    ] = None,
    paired_forward: Annotated[
        Optional[bool], _opt("--paired-forward/--no-paired-forward", "One tuned layer: evaluate + and - as one forward of 2x the batch (the layers above run once). [default: the device's measured default]")
    ] = None,
    keep: Annotated[Optional[str], _opt("--keep", "Weights the patch keeps: best (best dev accuracy, base included) or last. [default: best]")] = None,
    checkpoint_every: Annotated[
        Optional[int], _opt("--checkpoint-every", "Save a resumable checkpoint in OUT.ckpt/ every N steps (0: only on Ctrl-C). [default: 50]")
    ] = None,
    save: Annotated[str, typer.Option(
        "--save", help="weights (a weight patch) or trajectory (manifest + trajectory only, KBs; rebuilt from the base).")] = "weights",
    record_local_paths: Annotated[bool, typer.Option(
        "--record-local-paths", help="Write the local model/data paths into the patch (default: their names only).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint in OUT.ckpt/ (same options).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder (and discard its checkpoint).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """ZO-tune one layer (MeZO two-sided SPSA, forward passes only) and save a layer patch."""
    from layerzo.errors import TuneInterrupted
    from layerzo.tune.config import config_from_options
    from layerzo.tune.loop import tune as run_tune

    config = config_from_options(recipe, ctx.params)  # the recipe keys among the parsed options
    try:
        result = run_tune(config, out, overwrite=overwrite, progress=not quiet, resume=resume,
                          note=lambda line: err_console.print(line, highlight=False, soft_wrap=True), read_paths=[recipe] if recipe else [],
                          record_paths=record_local_paths, save=save)
    except TuneInterrupted as exc:  # Ctrl-C or SIGTERM: a checkpoint was saved; say exactly how to continue
        err_console.print(str(exc), style="yellow", markup=False, highlight=False, soft_wrap=True)
        err_console.print(f"resume with: {resume_command(ctx)}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(code=128 + exc.signum) from None  # the shell's convention: 130 SIGINT, 143 SIGTERM
    from layerzo.zo.distributed import is_main_process

    if not is_main_process():  # under torchrun rank 0 alone reports
        return
    m = result.metrics
    if json_out:
        emit_json({"out": str(result.out_dir), "layers": list(result.layers), "metrics": m})
        return

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    typer.echo(f"patch: {result.out_dir}")
    typer.echo(f"layers: {', '.join(map(str, result.layers))}")
    name = m.get("metric", "acc")  # generative tasks: f1 (and em)
    typer.echo(f"dev {name}: {pct(m[f'zero_shot_dev_{name}'])} zero-shot -> {pct(m[f'best_dev_{name}'])} best "
               f"(step {m['best_step']})")
    typer.echo(f"test {name}: {pct(m[f'zero_shot_test_{name}'])} zero-shot -> {pct(m[f'test_{name}'])}")
    if "test_em" in m:
        typer.echo(f"test em: {pct(m['zero_shot_test_em'])} zero-shot -> {pct(m['test_em'])}")
    typer.echo(f"steps: {m['steps']} ({m['steps_per_second']} steps/s, {m['wall_seconds']:.0f} s total)")
    if m.get("rejected_steps"):
        err_console.print(f"[yellow]{m['rejected_steps']} step(s) rejected (non-finite loss or |g| too large)[/]")
