"""Jinja2 rendering for the web board: one environment, autoescaped, with the formatting
filters the templates share.

Everything a template prints comes from hostile input at some point (story names, reasons,
gate output, agent logs), so autoescape is on for every template and nothing is marked
safe; the response headers forbid inline script as a second line of defence.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

TEMPLATE_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
HEADERS = {
    # Fragments depend on the caller's token: no cache may hand them to another.
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
}


def _when(value: Any) -> str:
    """A moment as ``YYYY-MM-DD HH:MM:SS`` in UTC (the log's own clock)."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _money(value: Any) -> str:
    amount = float(value or 0.0)
    if not math.isfinite(amount):
        return "?"
    return f"${amount:.4f}" if 0 < amount < 0.01 else f"${amount:.2f}"


def _duration(seconds: Any) -> str:
    if seconds is None:
        return ""
    total = max(int(float(seconds)), 0)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _count(value: Any) -> str:
    return f"{int(value or 0):,}"


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATE_DIR),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.filters["when"] = _when
    env.filters["money"] = _money
    env.filters["duration"] = _duration
    env.filters["count"] = _count
    return env


ENV = _environment()


def render(template: str, **context: Any) -> str:
    return ENV.get_template(template).render(**context)


def html(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(render(template, **context), status_code=status_code, headers=HEADERS)


def no_content() -> HTMLResponse:
    return HTMLResponse(b"", status_code=204, headers=HEADERS)


__all__ = ["HEADERS", "STATIC_DIR", "TEMPLATE_DIR", "html", "no_content", "render"]
