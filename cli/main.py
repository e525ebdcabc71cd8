"""``layerzo`` console script: a Typer app whose commands live one per module.

Each command module exposes ``register(app)``; heavy imports (torch,
transformers, lm_eval, onnx) happen inside command bodies so ``--help`` is fast.
"""

from __future__ import annotations

import importlib

import typer

from layerzo import __version__

COMMAND_MODULES = ("profile", "tune", "apply", "hub", "eval", "export", "sweep")

app = typer.Typer(
    name="layerzo",
    help="Dominant-layer zeroth-order fine-tuning: profile, tune one layer, ship a layer patch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"layerzo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """layerzo command line."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"layerzo.cli.{_name}").register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
