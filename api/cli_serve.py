"""``storyline serve``: the HTTP API (uvicorn) with the projections and runners beside it.

Background work (the projection follower, as a thread or a child process, and the runner
supervisor) is a list of components with ``start()``/``stop()`` built by
:func:`build_components`; the app's lifespan starts them after the socket is bound and stops
them on shutdown.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import typer

from api.auth import StaticTokens, TokenError, is_loopback, load_tokens
from service.config_file import ConfigError
from service.container import Service, open_service
from service.settings import SettingsError

if TYPE_CHECKING:
    from api.routes_common import BackgroundComponent

SWITCH_INTERVAL = 0.0005
"""GIL switch interval for the server process (Python's default is 5 ms). The event loop
thread gives the GIL up on every socket call and then waits behind the threadpool and the
projection runner for up to a whole interval; measured with 4 clients, a shorter interval
raised HTTP transitions/s by a third and cut p99 latency by half (bench/http_transitions.py)."""

POOL_SIZE = 12
"""Database connections the API keeps (plus the library's overflow of 10): enough for the
threadpool's concurrent commands without starving the projection runner."""


class BindRefused(Exception):
    pass


def check_bind(host: str, tokens: StaticTokens) -> str | None:
    """Refuse an unauthenticated API off loopback; returns a warning to print, if any."""
    if tokens:
        return None
    if not is_loopback(host):
        raise BindRefused(
            f"refusing to serve on {host!r} without API tokens: configure [[server.tokens]] "
            "in storyline.toml (or $STORYLINE_TOKENS), or bind to 127.0.0.1"
        )
    return (
        f"no API tokens configured: authentication is off and the API only listens on "
        f"loopback ({host}); every request acts as user:local with the admin role"
    )


def runner_components(service: Service, *, api_url: str) -> list[BackgroundComponent]:
    """Hook for the runner supervisor (worktrees, coders, gates, merges).

    Returns the components ``serve`` runs unless ``--no-runners`` is given; ``api_url`` is
    where this server can be reached by the agents it spawns (``STORYLINE_URL``). A
    component may offer ``status()`` (a dict, a list of dicts, or an object with
    ``as_json()``) for ``/healthz``; ``"error"`` set or ``"running": false`` shows there as
    degraded.
    """
    from runners.supervisor import Supervisor

    return [Supervisor(service, api_url=api_url)]


def _status_dicts(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, list):
        return [item for entry in value for item in _status_dicts(entry)]
    if isinstance(value, dict):
        return [value]
    if hasattr(value, "as_json"):
        return [dict(value.as_json())]
    return [{"status": str(value)}]


ProjectionsMode = Literal["auto", "thread", "process"]


def projection_component(service: Service, mode: ProjectionsMode) -> BackgroundComponent:
    """The projection follower: a thread of this process, or a child process.

    ``auto`` is a child process on PostgreSQL (it runs on another core instead of taking the
    API's GIL: HTTP transitions/s +45% with 4 clients, see BENCHMARKS.md) and a thread on
    SQLite, where the in-process commit listener wakes it at once and one process keeps
    the single-file database to itself.
    """
    if mode == "auto":
        mode = "process" if service.db.kind == "postgres" else "thread"
    if mode == "process":
        from projections.process import ProjectionProcess

        return ProjectionProcess(service.db)
    from projections import ProjectionRunner

    return ProjectionRunner(service.db, service.app)


def _is_process(component: BackgroundComponent) -> bool:
    from projections.process import ProjectionProcess

    return isinstance(component, ProjectionProcess)


def build_components(
    service: Service, *, runners: bool, api_url: str, projections: ProjectionsMode = "thread"
) -> tuple[list[BackgroundComponent], Callable[[], list[dict[str, Any]]]]:
    """The background components of a server and their status for ``/healthz``."""
    follower = projection_component(service, projections)
    components: list[BackgroundComponent] = [follower]
    supervised = runner_components(service, api_url=api_url) if runners else []
    components.extend(supervised)
    # A follower thread reports through the projections' own status; a child process
    # also reports whether it is running.
    reported = [follower] if _is_process(follower) else []
    reported.extend(supervised)

    def runner_status() -> list[dict[str, Any]]:
        statuses: list[dict[str, Any]] = []
        for component in reported:
            status = getattr(component, "status", None)
            if callable(status):
                statuses.extend(_status_dicts(status()))
        return statuses

    return components, runner_status


def make_app(
    service: Service,
    *,
    tokens: StaticTokens,
    api_url: str,
    runners: bool = True,
    projections: ProjectionsMode = "thread",
    extra_components: Sequence[BackgroundComponent] = (),
) -> tuple[Any, Any]:
    """The ASGI app of ``serve`` and its read models (close them after the server)."""
    from api.app import create_app
    from projections import ReadModels

    read_models = ReadModels(service.db)
    components, runner_status = build_components(
        service, runners=runners, api_url=api_url, projections=projections
    )
    app = create_app(
        service,
        read_models,
        tokens=tokens,
        components=[*components, *extra_components],
        runner_status=runner_status,
    )
    return app, read_models


def stoppable_server(config: Any, app: Any) -> Any:
    """A uvicorn server that ends the app's event streams as soon as it is asked to stop.

    uvicorn waits for open requests before the lifespan shutdown runs, and an event
    stream never ends by itself: each connected client (a board, ``storyline watch``)
    would hold a SIGTERM for the whole graceful-shutdown timeout."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            app.state.storyline.notifier.close()

    return _Server(config)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def serve(
    project: Annotated[
        Path | None,
        typer.Option(
            "--project", "-C", help="Project directory (default: $STORYLINE_PROJECT or .)"
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="Database URL (default: $STORYLINE_DATABASE_URL or embedded SQLite)",
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Address to bind (default: [server] host)")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="Port (default: [server] port, 8765)")
    ] = None,
    no_runners: Annotated[
        bool, typer.Option("--no-runners", help="Serve the API and projections only.")
    ] = False,
    projections: Annotated[
        str,
        typer.Option(
            "--projections",
            help="Where the projection follower runs: thread (this process), process "
            "(a child process), or auto (process on PostgreSQL, thread on SQLite).",
        ),
    ] = "auto",
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Serve the HTTP API with the projections and the runners (agents, gates, merges).

    Stops on SIGTERM or Ctrl-C: open event streams end at once, running agents are stopped
    (their exits recorded) and a gate or merge command in progress is waited for."""
    import uvicorn

    from api.http_protocol import capped_protocol

    if projections not in ("auto", "thread", "process"):
        typer.echo(
            f"error: --projections must be auto, thread or process, not {projections!r}", err=True
        )
        raise typer.Exit(2)
    mode = cast(ProjectionsMode, projections)
    try:
        service = open_service(project, database_url, pool_size=POOL_SIZE)
    except (ConfigError, SettingsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        try:
            tokens = load_tokens(service.config.server)
            bind = host or service.config.server.host
            warning = check_bind(bind, tokens)
        except (TokenError, BindRefused) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        if warning:
            typer.echo(f"warning: {warning}", err=True)
        else:
            typer.echo(f"authentication on: {len(tokens)} API token(s) configured", err=True)
        listen_port = port if port is not None else service.config.server.port
        # Agents run on this machine: they reach a wildcard bind through loopback.
        local_host = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind
        api_url = f"http://{_url_host(local_host)}:{listen_port}"
        app, read_models = make_app(
            service, tokens=tokens, api_url=api_url, runners=not no_runners, projections=mode
        )
        typer.echo(
            f"storyline API on http://{bind}:{listen_port} (database {service.db.display})",
            err=True,
        )
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            server = stoppable_server(
                uvicorn.Config(
                    app,
                    host=bind,
                    port=listen_port,
                    log_level=log_level,
                    server_header=False,
                    timeout_graceful_shutdown=5,
                    **capped_protocol(),
                ),
                app,
            )
            # uvicorn re-raises the Ctrl-C it handled; the shutdown was already graceful.
            with contextlib.suppress(KeyboardInterrupt):
                server.run()
        finally:
            read_models.close()
    finally:
        service.close()


__all__ = [
    "BindRefused",
    "build_components",
    "check_bind",
    "make_app",
    "projection_component",
    "runner_components",
    "serve",
]
