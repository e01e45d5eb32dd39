"""The ``replica`` command line. Heavy imports stay inside commands so ``--help`` is instant."""
from __future__ import annotations

import typer

app = typer.Typer(
    help="replica: find where generated images replicate their training data, across the whole corpus.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
