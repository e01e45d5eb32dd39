"""Flags made from the config dataclasses, so a flag and its config field can never disagree.

The rule (also in pipeline/config.py): field ``f`` of a section is ``--f``; field ``f`` of a
nested section ``s`` is ``--s-f``, and ``s.name`` is ``--s``. Help text is the field's ``#:``
comment, the default is shown, and fields with choices become ``click.Choice``.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import click

from pipeline.config import field_docs

#: Short forms, the same in every command that has the flag.
SHORT = {"config": "-c", "input": "-i", "output": "-o", "quiet": "-q", "run": "-r"}


@dataclass(frozen=True)
class Flag:
    """One generated flag and the config field it sets."""

    flag: str
    path: tuple[str, ...]
    help: str
    default: Any
    kind: Any
    multiple: bool
    choices: tuple | None

    @property
    def param(self) -> str:
        return "__".join(self.path)

    @property
    def field(self) -> str:
        return ".".join(self.path)


def _flag_name(path: tuple[str, ...]) -> str:
    if len(path) == 2 and path[1] == "name":
        return "--" + path[0].replace("_", "-")
    return "--" + "-".join(p.replace("_", "-") for p in path)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is a list) of a field annotation."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is list:
        return args[0], True
    if args and origin is not None:
        return _base_type(args[0])
    return tp, False


def flags_of(cls: type, only: Iterable[str] | None = None, _prefix: tuple[str, ...] = ()) -> list[Flag]:
    """Every flag of a config dataclass (``only``: top-level field names to keep)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    keep = set(only) if only is not None else None
    out: list[Flag] = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        if keep is not None and not _prefix and f.name not in keep:
            continue
        path = (*_prefix, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(flags_of(tp, None, path))
            continue
        kind, multiple = _base_type(tp)
        default = getattr(defaults, f.name)
        out.append(Flag(_flag_name(path), path, docs.get(f.name, ""), default, kind, multiple,
                        tuple(f.metadata["choices"]) if "choices" in f.metadata else None))
    return out


def _shown_default(flag: Flag, section_default: Any) -> str | bool:
    value = section_default
    if value in (None, "", [], ()):
        return False
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def click_option(flag: Flag, section_default: Any = None) -> click.Option:
    """The click option of one flag. Its click default is None: "not given" lets the file's value stand."""
    names = [flag.flag]
    if len(flag.path) == 1 and flag.path[0] in SHORT:
        names.append(SHORT[flag.path[0]])
    help_text = flag.help or flag.field
    shown = _shown_default(flag, flag.default if section_default is None else section_default)
    if flag.kind is bool:
        return click.Option([f"{flag.flag}/--no-{flag.flag[2:]}", flag.param], default=None, help=help_text,
                            show_default=shown)
    types = {int: click.INT, float: click.FLOAT, str: click.STRING}
    kind = click.Choice(flag.choices) if flag.choices else types.get(flag.kind, click.STRING)
    return click.Option([*names, flag.param], type=kind, multiple=flag.multiple, default=None, help=help_text,
                        show_default=shown)


def overrides_from(kwargs: dict[str, Any], flags: list[Flag]) -> dict[str, Any]:
    """The flags a user gave, as a nested mapping of config fields (what was not given is left out)."""
    out: dict[str, Any] = {}
    for flag in flags:
        value = kwargs.pop(flag.param, None)
        if value is None or (flag.multiple and not value):
            continue
        node = out
        for part in flag.path[:-1]:
            node = node.setdefault(part, {})
        node[flag.path[-1]] = list(value) if flag.multiple else value
    return out


def rewrite_renamed(args: list[str], renamed: dict[str, str]) -> tuple[list[str], list[str]]:
    """Replace last release's flag names with today's; returns the new args and one warning per rename."""
    out, notes = [], []
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in renamed:
            new = renamed[name]
            notes.append(f"{name} is deprecated; use {new} (accepted until the next release)")
            out.append(new + eq + value if eq else new)
        else:
            out.append(arg)
    return out, notes


class Command(click.Command):
    """A command that accepts last release's flag names, with a warning on stderr."""

    def __init__(self, *args: Any, renamed: dict[str, str] | None = None, **kwargs: Any):
        kwargs.setdefault("context_settings", {"show_default": True, "max_content_width": 110})
        super().__init__(*args, **kwargs)
        self.renamed = renamed or {}

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        from pipeline.errors import ConfigError

        args, notes = rewrite_renamed(list(args), self.renamed)
        for note in notes:
            click.secho(f"warning: {note}", fg="yellow", err=True)
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:  # one line, exit 2, like every refusal
            raise ConfigError(f"{exc.format_message()} (see `{ctx.command_path} --help`)") from None


def command(group: click.Group, name: str, params: list[click.Parameter], callback: Callable[..., Any],
            help: str, renamed: dict[str, str] | None = None) -> click.Command:
    cmd = Command(name, params=params, callback=callback, help=help, renamed=renamed)
    group.add_command(cmd)
    return cmd
