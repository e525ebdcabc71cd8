"""``layerzo generate``: the base model's and the patched model's greedy answers to one prompt, streamed.

Options map onto :func:`layerzo.eval.compare.compare_generations`; each answer
streams to stdout under its header line as it is generated (base first, then
patched), ``--json`` prints one JSON object instead; progress goes to stderr.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from .common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    RevisionOpt,
    TokenOpt,
    TrustRemoteCodeOpt,
    emit_json,
    err_console,
    handle_errors,
)


def register(app: typer.Typer) -> None:
    """Add ``generate`` to the app."""
    app.command("generate")(generate)


@handle_errors
def generate(
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="The text both models answer.")],
    patch: Annotated[str, typer.Option("--patch", "-p", help="Layer patch folder or Hub repo id.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Base: checkpoint dir, .gguf, Hub id or "
                                                 "'demo' (default: the base the patch was made on).",
                                                 show_default=False)] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Send PROMPT as a user turn of the tokenizer's chat template; "
                                       "stop at the end of the turn.")] = False,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Longest answer in tokens "
                                                          "(default: the patch's).", show_default=False)] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", metavar="<str>", help="Stop string, repeatable; \\n is a newline, "
                                                      "'' stops at EOS only (default: the patch task's).",
                                                      show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Apply the patch even if the base fingerprint differs.")] = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Answer PROMPT greedily with the base model, then with base + patch: what the patch changed."""
    from layerzo.eval.compare import compare_generations, parse_stop

    shown: list[str] = []  # the labels whose answer has started

    def stream(label: str, text: str) -> None:
        if text == "" and label not in shown:
            sys.stdout.write(("\n" if shown else "") + f"{label}:\n")
            shown.append(label)
        sys.stdout.write(text)
        sys.stdout.flush()

    result = compare_generations(
        patch, prompt, model=model, chat=chat, max_new_tokens=max_new_tokens,
        stop=parse_stop(stop) if stop else None, on_token=None if json_out else stream, force=force, dtype=dtype,
        device=device, revision=revision, token=token, trust_remote_code=trust_remote_code,
        progress=lambda msg: err_console.print(f"[dim]{msg}[/]", highlight=False),
    )
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    if json_out:
        emit_json(result.to_dict())
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
