"""The ``ganprint`` Typer app. Commands live in sibling modules, each exposing ``register(app)``.

Start-up imports only typer and this package's light modules, so ``--help`` and shell
completion (which runs ``ganprint`` on every TAB) stay fast.
"""

from __future__ import annotations

import importlib

import typer

from ganprint import __version__

app = typer.Typer(
    name="ganprint",
    help="Membership-inference audits for synthetic medical images: which real images did the GAN train on?",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold patient file paths
    add_completion=True,
    rich_markup_mode=None,
)

# order = order in --help; each module defines register(app)
COMMAND_MODULES: tuple[str, ...] = (
    "synth",
    "embed",
    "simmatrix",
    "train",
    "fuse",
    "predict",
    "score",
    "info",
    "demo",
    "audit",
    "report",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ganprint {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Membership-inference audits for synthetic medical images."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"ganprint.cli.{_name}").register(app)


def main() -> None:
    app(prog_name="ganprint")


if __name__ == "__main__":
    main()
