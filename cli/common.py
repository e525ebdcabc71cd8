"""Shared option aliases, output helpers and error handling for the CLI.

Commands only parse options and call the library. Results go to stdout
(``--json`` for machines); progress and tables go to stderr.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
from rich.console import Console

from layerzo.core.env import debug_enabled
from layerzo.errors import LayerzoError

err_console = Console(stderr=True)
out_console = Console()

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Checkpoint dir, .gguf file or Hub id (default: the SmolLM2-135M demo)."),
]
DataDirOpt = Annotated[
    Optional[Path],
    typer.Option("--data-dir", help="Folder with <task>/{train,validation}.jsonl (default: HF datasets, online)."),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32 or bfloat16 (frozen model precision).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ...")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
TrustRemoteCodeOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow model code from the checkpoint (off by default).")
]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit).")]
TokenOpt = Annotated[
    Optional[str], typer.Option("--token", help="Hub token (default: $HF_TOKEN). Never written anywhere.")
]

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(func: F) -> F:
    """Turn a LayerzoError (or an OSError) into one line on stderr and exit code 1.

    ``LAYERZO_DEBUG=1`` re-raises so the full traceback is shown.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (LayerzoError, OSError) as exc:
            if debug_enabled():
                raise
            if isinstance(exc, LayerzoError):
                line = exc.one_line()
            else:
                line = f"{exc.strerror or type(exc).__name__}: {exc.filename or ''}".rstrip(": ")
            err_console.print(f"[bold red]error:[/] {line}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def emit_json(obj: Any) -> None:
    """Write a JSON result to stdout (one document, newline-terminated)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()
