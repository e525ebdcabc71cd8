"""``layerzo push`` / ``layerzo pull``: layer patches on the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import JsonOpt, RevisionOpt, TokenOpt, emit_json, err_console, handle_errors

EndpointOpt = Annotated[
    Optional[str], typer.Option("--endpoint", help="Hub endpoint URL (default: $HF_ENDPOINT or huggingface.co).")
]


def register(app: typer.Typer) -> None:
    """Add ``push`` and ``pull`` to the app."""
    app.command("push")(push)
    app.command("pull")(pull)


@handle_errors
def push(
    patch: Annotated[Path, typer.Argument(metavar="PATCH", help="Layer patch folder (written by layerzo tune).")],
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="Hub repo id, org/name (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    endpoint: EndpointOpt = None,
    commit_message: Annotated[Optional[str], typer.Option("--commit-message", help="Commit message.")] = None,
    trajectory_only: Annotated[bool, typer.Option(
        "--trajectory-only", help="Upload manifest, card and trajectory only (KBs); users rebuild the weights.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Upload a layer patch (validated first) to a Hub model repo."""
    from layerzo.patch.source import push_patch

    pushed = push_patch(patch, repo_id, token=token, private=private, revision=revision, endpoint=endpoint,
                        commit_message=commit_message, trajectory_only=trajectory_only)
    err_console.print(f"pushed {patch} to {repo_id} (the repo is {pushed.visibility})", highlight=False)
    if json_out:
        emit_json({"repo_id": repo_id, "commit_url": pushed.commit_url, "private": pushed.private})
    else:
        typer.echo(pushed.commit_url)


@handle_errors
def pull(
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="Hub repo id of a layer patch.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the patch to (must not exist).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    endpoint: EndpointOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Download a layer patch, validate it, and save it to a folder (pinned to the resolved commit)."""
    from layerzo.patch.source import pull_to_dir

    folder, commit = pull_to_dir(repo_id, out, revision=revision, token=token, endpoint=endpoint, overwrite=overwrite)
    err_console.print(f"pulled {repo_id}@{commit} to {folder}")
    emit_json({"repo_id": repo_id, "revision": commit, "path": str(folder)}) if json_out else typer.echo(str(folder))
