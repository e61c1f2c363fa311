"""`sessions-export emulator`: serve the local Trigger.dev sessions API emulator.

Its flags are made from `EmulatorConfig`'s fields, so a new emulator option is one field.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from pipeline.emulator.config import EmulatorConfig
from pipeline.emulator.server import serve
from pipeline.emulator.timestamps import now_ms


def _anchor(_ctx: click.Context, _param: click.Parameter, value: str | None) -> datetime:
    if value is None:
        return datetime.fromtimestamp(now_ms() / 1000, UTC)
    try:
        anchor = datetime.fromisoformat(value)
    except ValueError as error:
        raise click.BadParameter(f"not an ISO-8601 date or datetime: {value!r}") from error
    return anchor if anchor.tzinfo else anchor.replace(tzinfo=UTC)


def _number_type(hint: Any, meta: dict[str, Any]) -> click.ParamType | type:
    """int or float, as a click range when the field declares one."""
    low, high, above = meta["at_least"], meta["at_most"], meta["above"]
    if low is None and high is None and above is None:
        return hint
    if hint is int:
        return click.IntRange(min=low, max=high)
    if above is not None:
        return click.FloatRange(min=above, max=high, min_open=True)
    return click.FloatRange(min=low, max=high)


def config_flag(spec: dataclasses.Field, hint: Any) -> Callable[[Callable], Callable]:
    """The click option of one `EmulatorConfig` field."""
    meta = spec.metadata["flag"]
    name = meta["name"] or "--" + spec.name.replace("_", "-")
    if hint is bool:
        # a flag turns a default off (--no-rate-limit) or on (--allow-remote)
        return click.option(
            name, spec.name, flag_value=not spec.default, default=spec.default, help=meta["help"]
        )
    if typing.get_origin(hint) is tuple:
        return click.option(name, spec.name, multiple=True, default=spec.default, help=meta["help"])
    if spec.name == "anchor":
        return click.option(name, spec.name, callback=_anchor, help=meta["help"])
    if meta["file"]:
        kind: Any = click.Path(exists=True, dir_okay=False)
    elif typing.get_origin(hint) is typing.Literal:
        kind = click.Choice(typing.get_args(hint))
    elif hint in (int, float):
        kind = _number_type(hint, meta)
    else:
        kind = str
    shown = spec.default not in (None, "")
    return click.option(
        name, spec.name, type=kind, default=spec.default, show_default=shown, help=meta["help"]
    )


def with_config_flags(command: Callable) -> Callable:
    """Add a flag for every `EmulatorConfig` field, in declaration order."""
    hints = typing.get_type_hints(EmulatorConfig)
    for spec in reversed(dataclasses.fields(EmulatorConfig)):
        command = config_flag(spec, hints[spec.name])(command)
    return command


@click.command("emulator")
@with_config_flags
def emulator_command(**options: Any) -> None:
    """Serve a local stand-in for Trigger.dev's sessions API, with generated sessions."""
    try:
        config = EmulatorConfig(**options)
        serve(config, announce=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a foreground emulator is meant to stop
    except (ValueError, OSError) as error:
        raise click.UsageError(str(error)) from error
