"""The ``replica`` command line: one group, one error wrapper, one exit-code table.

Exit codes (pipeline/errors.py): 0 ok; 1 the run failed or is incomplete (rerun to resume);
2 refused before any work (usage, config, validation); 3 finished but data failures exceeded
the limits; 4 the output is locked by another run. A :class:`~pipeline.errors.ReplicaError`
prints one line, ``error: ...``, on stderr.

Heavy imports (torch, faiss, Ray, pyarrow) stay inside the commands, so ``--help`` is instant.
"""
from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import click

from pipeline.errors import ReplicaError


def package_version() -> str:
    try:
        return version("replica-search")
    except PackageNotFoundError:  # running from a source tree (e.g. a Ray job's working dir)
        return "0.2.0.dev0"


class ReplicaGroup(click.Group):
    """Turns a :class:`ReplicaError` into its one-line message and exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ReplicaError as exc:
            # raised inside a Ray task, it arrives wrapped with a traceback: show the original's words
            message = str(getattr(exc, "cause", None) or exc).strip().splitlines()
            click.secho(f"error: {message[-1] if message else type(exc).__name__}", fg="red", err=True)
            ctx.exit(exc.exit_code)


@click.group("replica", cls=ReplicaGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_version(), "--version", prog_name="replica")
def app() -> None:
    """replica: find where generated images replicate their training data, across the whole corpus.

    \b
    Exit codes: 0 ok; 1 failed or incomplete (rerun to resume); 2 refused before any work;
    3 data failures over the --max-failed-* limits; 4 output locked by another run.
    """


from pipeline.cli import commands as _commands  # noqa: E402,F401  (registers the commands on `app`)


def main() -> None:
    sys.exit(app.main(prog_name="replica"))


if __name__ == "__main__":
    main()
