"""``layerzo`` console script: a Typer app whose commands live one per module.

Each command module exposes ``register(app)``; heavy imports (torch,
transformers, lm_eval, onnx) happen inside command bodies so ``--help`` is fast.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from layerzo import __version__

COMMAND_MODULES = ("profile", "tune", "apply", "hub", "eval", "generate", "export", "sweep")

# click's exception classes, reached through a public subclass: newer typers vendor click under a private name
USAGE_ERROR = next(k for k in typer.BadParameter.__mro__ if k.__name__ == "UsageError")
CLICK_ERROR = next(k for k in typer.BadParameter.__mro__ if k.__name__ == "ClickException")


class OneLineUsageErrors(TyperGroup):
    """The app's group: a usage error (unknown option, missing or malformed value) is ONE line on
    stderr and exit code 2, like every other error; help and exit codes are click's."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except USAGE_ERROR as exc:
            see = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            typer.echo(f"error: {' '.join(exc.format_message().split())}{see}", err=True)
            sys.exit(exc.exit_code)
        except CLICK_ERROR as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)  # a command returns None; typer.Exit(n) gives n


# Plain click help (rich_markup_mode=None): at 80 columns rich cut long option names ("--record-local-pa…")
# and ate "[default: ...]" as markup; click wraps the help text and always shows names and defaults in full.
app = typer.Typer(
    name="layerzo",
    help="Dominant-layer zeroth-order fine-tuning: profile, tune one layer, ship a layer patch.",
    invoke_without_command=True,  # bare `layerzo` prints the help (see _root)
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    cls=OneLineUsageErrors,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"layerzo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """layerzo command line."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit()


for _name in COMMAND_MODULES:
    importlib.import_module(f"layerzo.cli.{_name}").register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
