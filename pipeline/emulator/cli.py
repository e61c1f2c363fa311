"""`sessions-export emulator`: serve the local Trigger.dev sessions API emulator."""

from __future__ import annotations

from datetime import UTC, datetime

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


def _probability(_ctx: click.Context, _param: click.Parameter, value: float) -> float:
    if not 0 <= value <= 1:
        raise click.BadParameter("must be a probability between 0 and 1")
    return value


@click.command("emulator")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--port",
    default=8787,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="0 picks a free port.",
)
@click.option("--allow-remote", is_flag=True, help="Allow a non-loopback --host.")
@click.option(
    "--sessions",
    default=1000,
    show_default=True,
    type=click.IntRange(min=0),
    help="How many sessions to generate.",
)
@click.option("--seed", default=1, show_default=True, help="Data seed: same seed, same data.")
@click.option(
    "--days",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="createdAt spans [anchor - days, anchor].",
)
@click.option("--anchor", callback=_anchor, help="Newest createdAt (ISO-8601). Default: now.")
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    help="Accept only these keys (repeatable). Default: any tr_dev_/tr_stg_/tr_prod_/"
    "tr_preview_ key (a preview key also needs the x-trigger-branch header).",
)
@click.option(
    "--forbidden-key",
    "forbidden_keys",
    multiple=True,
    help="Answer this key with 403 (repeatable).",
)
@click.option(
    "--list-trigger-config",
    type=click.Choice(["omit", "include"]),
    default="omit",
    show_default=True,
    help="omit: list rows lack triggerConfig (upstream source); include: as the docs show.",
)
@click.option("--no-rate-limit", "no_rate_limit", is_flag=True, help="Turn the rate limit off.")
@click.option(
    "--rate-limit-burst",
    default=750,
    show_default=True,
    type=click.IntRange(min=1),
    help="Bucket size per key.",
)
@click.option(
    "--rate-limit-refill",
    default=250,
    show_default=True,
    type=click.IntRange(min=1),
    help="Tokens added each interval.",
)
@click.option(
    "--rate-limit-interval",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds between refills.",
)
@click.option("--fault-seed", default=0, show_default=True, help="Seed of the fault draws.")
@click.option(
    "--fault-5xx", default=0.0, callback=_probability, help="Probability of a 500/502/503/504."
)
@click.option(
    "--fault-reset",
    default=0.0,
    callback=_probability,
    help="Probability of dropping the connection mid-response.",
)
@click.option(
    "--fault-truncate",
    default=0.0,
    callback=_probability,
    help="Probability of a 200 whose JSON body is cut in half.",
)
@click.option(
    "--fault-stall",
    default=0.0,
    callback=_probability,
    help="Probability of waiting --stall-seconds before answering.",
)
@click.option(
    "--stall-seconds",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Length of a stall.",
)
@click.option(
    "--latency-ms",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Added to every API request.",
)
@click.option(
    "--fault-header-should-retry",
    is_flag=True,
    help="Sometimes send x-should-retry: false with an injected 5xx.",
)
@click.option(
    "--id-skew-ms",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Ids' time part off createdAt by up to N ms, as when ids are made before the insert.",
)
@click.option(
    "--replication-delay",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds before the list sees a new session or a change of tags or closing.",
)
@click.option(
    "--same-ms-burst",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Generate this many sessions sharing one millisecond, mid-range.",
)
@click.option(
    "--path-prefix",
    default="",
    help="Serve the API under this path (/trigger/api/v1/sessions), like a self-hosted "
    "server behind a reverse proxy.",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM certificate chain: serve https (with --tls-key).",
)
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="Its private key.")
def emulator_command(
    no_rate_limit: bool,
    api_keys: tuple[str, ...],
    forbidden_keys: tuple[str, ...],
    **options: object,
) -> None:
    """Serve a local stand-in for Trigger.dev's sessions API, with generated sessions."""
    try:
        config = EmulatorConfig(
            rate_limit=not no_rate_limit,
            api_keys=tuple(api_keys),
            forbidden_keys=tuple(forbidden_keys),
            **options,  # type: ignore[arg-type]
        )
        serve(config, announce=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a foreground emulator is meant to stop
    except (ValueError, OSError) as error:
        raise click.UsageError(str(error)) from error
