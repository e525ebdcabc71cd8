"""``layerzo apply``: merge a layer patch into a base checkpoint (shard-aware), or replay it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import JsonOpt, RevisionOpt, TokenOpt, emit_json, err_console, handle_errors


def register(app: typer.Typer) -> None:
    """Add ``apply`` to the app."""
    app.command("apply")(apply)


@handle_errors
def apply(
    base: Annotated[str, typer.Argument(metavar="BASE", help="Base model: checkpoint dir, Hub id, or .gguf file ('demo' = SmolLM2).")],
    patch: Annotated[str, typer.Argument(metavar="PATCH", help="Layer patch folder or Hub repo id.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output checkpoint folder (must not exist).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Apply even if base tensors differ from the patch's fingerprint.")
    ] = False,
    replay: Annotated[
        bool, typer.Option("--replay", help="Rebuild the layer from the trajectory + base and prove it equals the patch.")
    ] = False,
    replay_out: Annotated[
        Optional[Path], typer.Option("--replay-out", help="With --replay: also save the replayed patch here.")
    ] = None,
    revision: RevisionOpt = None,
    patch_revision: Annotated[Optional[str], typer.Option("--patch-revision", help="Hub revision of the patch.")] = None,
    token: TokenOpt = None,
    gguf_type: Annotated[
        Optional[str], typer.Option("--gguf-type", help="With OUT.gguf: type of the patched tensors: F16 (default), "
                                    "F32, Q8_0, or the base's own type.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Write OUT = BASE with PATCH applied: a complete checkpoint for AutoModelForCausalLM.from_pretrained."""
    from layerzo.errors import ConfigError, PatchError
    from layerzo.patch.format import LayerPatch

    if out is None and not replay:
        raise ConfigError("give the output folder with -o OUT (or use --replay to only verify the patch)")
    layer_patch = LayerPatch.from_pretrained(patch, revision=patch_revision, token=token)
    result: dict = {"patch": layer_patch.source, "patch_revision": layer_patch.source_revision}
    if replay:
        from layerzo.model.loading import check_model_source
        from layerzo.patch.replay import replay_patch

        check_model_source(None if base == "demo" else base, revision=revision)  # a bad base: one line, no progress
        err_console.print(f"replaying {len(layer_patch.trajectory)} ZO steps on {base} ...")
        replayed = replay_patch(None if base == "demo" else base, layer_patch, revision=revision)
        result["replay"] = {"steps": replayed.steps, "max_abs_diff": replayed.max_abs_diff,
                            "bit_exact": replayed.bit_exact}
        if replayed.bit_exact is None:
            err_console.print(f"replay: rebuilt the weights of a trajectory-only patch ({replayed.steps} steps)")
        else:
            err_console.print(f"replay: max |replayed - patch| = {replayed.max_abs_diff:.3g} "
                              f"({'bit-exact' if replayed.bit_exact else 'NOT bit-exact'})")
        if replay_out is not None:
            result["replay"]["saved"] = str(replayed.patch.save_pretrained(replay_out, overwrite=overwrite))
        if replayed.bit_exact is False:
            if json_out:
                emit_json(result)
            raise PatchError(f"the trajectory does not reproduce the patch (max abs diff {replayed.max_abs_diff:.3g})",
                             "the patch's tensors or trajectory were changed, or replay ran on another device type")
    if out is not None:
        from layerzo.patch.apply import apply_patch

        report = apply_patch(None if base == "demo" else base, layer_patch, out, overwrite=overwrite, force=force,
                             revision=revision, token=token, log=lambda line: err_console.print(line),
                             gguf_type=gguf_type)
        for note in report.notes:
            err_console.print(f"[yellow]note:[/] {note}", highlight=False)
        err_console.print(f"wrote {report.out}: rewrote {len(report.rewritten)} shard(s), hard-linked "
                          f"{len(report.linked)}, copied {len(report.copied)} file(s)")
        result["apply"] = report.to_dict()
    if json_out:
        emit_json(result)
    elif out is not None:
        typer.echo(str(out))
