"""Serve the emulator with uvicorn: in the foreground, or in a thread for tests."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import TracebackType

import uvicorn

from pipeline.emulator.app import DroppedConnection, EmulatorApp
from pipeline.emulator.config import EmulatorConfig
from pipeline.emulator.stats import EmulatorStats
from pipeline.emulator.store import SessionStore
from pipeline.hosts import is_loopback

_STARTUP_TIMEOUT_S = 30.0


class _HideDroppedConnections(logging.Filter):
    """uvicorn logs an app exception as an error; a dropped connection is a planned fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, DroppedConnection)


def build_app(config: EmulatorConfig) -> EmulatorApp:
    store = SessionStore.generate(
        config.sessions,
        seed=config.seed,
        days=config.days,
        anchor_ms=config.anchor_ms(),
        id_skew_ms=config.id_skew_ms,
        replication_delay_ms=round(config.replication_delay * 1000),
        same_ms_burst=config.same_ms_burst,
    )
    return EmulatorApp(config, store)


def _check_host(config: EmulatorConfig) -> None:
    if not (config.allow_remote or is_loopback(config.host)):
        raise ValueError(
            f"refusing to listen on non-loopback host {config.host!r}; pass --allow-remote"
        )


def _bind(config: EmulatorConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on such sockets, and without
    # it Nagle plus delayed ACKs add ~40 ms to every response sent in two writes.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, config.port))
        sock.listen(2048)  # listening already, so a client may connect before uvicorn accepts
    except OSError:
        sock.close()
        raise
    return sock


def _url(sock: socket.socket, config: EmulatorConfig) -> str:
    host, port = sock.getsockname()[:2]
    scheme = "https" if config.tls_cert else "http"
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{scheme}://{netloc}{config.path_prefix.rstrip('/')}"


def _uvicorn_server(app: EmulatorApp) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        ssl_certfile=app.config.tls_cert,
        ssl_keyfile=app.config.tls_key,
        http="httptools",
        ws="none",
        lifespan="off",
        log_level="warning",
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=2,
    )
    # uvicorn.Config has just (re)configured logging, so attach the filter afterwards.
    error_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideDroppedConnections) for f in error_log.filters):
        error_log.addFilter(_HideDroppedConnections())
    return uvicorn.Server(config)


def serve(config: EmulatorConfig, announce: Callable[[str], None] = print) -> None:
    """Run until interrupted; `announce` gets the one "listening" line with the real port."""
    _check_host(config)
    app = build_app(config)
    sock = _bind(config)
    server = _uvicorn_server(app)
    announce(f"emulator listening on {_url(sock, config)} ({len(app.store)} sessions)")
    server.run(sockets=[sock])


@dataclass
class RunningEmulator:
    """An emulator serving from a background thread; `stop()` or use it as a context manager."""

    url: str
    app: EmulatorApp
    _server: uvicorn.Server
    _thread: threading.Thread

    @property
    def store(self) -> SessionStore:
        return self.app.store

    @property
    def stats(self) -> EmulatorStats:
        return self.app.stats

    @property
    def config(self) -> EmulatorConfig:
        return self.app.config

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> RunningEmulator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def start_in_thread(
    config: EmulatorConfig | None = None, *, port: int | None = 0
) -> RunningEmulator:
    """Start serving in a daemon thread and return once it accepts requests.

    `port=0` (the default) picks a free port whatever `config.port` says, so parallel tests
    never collide; pass `port=None` to use `config.port`.
    """
    config = config or EmulatorConfig()
    if port is not None:
        config = replace(config, port=port)
    _check_host(config)
    app = build_app(config)
    sock = _bind(config)
    server = _uvicorn_server(app)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="sessions-emulator", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the emulator did not start")
        time.sleep(0.005)
    return RunningEmulator(_url(sock, config), app, server, thread)
