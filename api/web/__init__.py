"""The web board served at ``/``: page shells, HTML fragments and their script and styles."""

from __future__ import annotations

from api.web.render import STATIC_DIR
from api.web.routes import router

__all__ = ["STATIC_DIR", "router"]
