"""Where the service keeps its data: the project directory and the database URL."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

DATABASE_URL_ENV = "STORYLINE_DATABASE_URL"
PROJECT_ENV = "STORYLINE_PROJECT"


class SettingsError(Exception):
    """A setting is missing or malformed; the message says which and how to fix it."""


@dataclass(frozen=True)
class Database:
    """A parsed database location. ``kind`` is ``sqlite`` or ``postgres``."""

    kind: str
    sqlite_path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    password: str = ""
    dbname: str = ""

    @property
    def sqlalchemy_url(self) -> str:
        if self.kind == "sqlite":
            return f"sqlite:///{self.sqlite_path}"
        from urllib.parse import quote

        auth = quote(self.user, safe="")
        if self.password:
            auth += ":" + quote(self.password, safe="")
        return f"postgresql+psycopg://{auth}@{self.host}:{self.port}/{quote(self.dbname, safe='')}"

    @property
    def url(self) -> str:
        """A URL that ``parse_database_url`` turns back into this location."""
        if self.kind == "sqlite":
            return f"sqlite:///{self.sqlite_path}"
        return self.sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)

    @property
    def display(self) -> str:
        """The location without any password, for logs and status output."""
        if self.kind == "sqlite":
            return f"sqlite:{self.sqlite_path}"
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"


def parse_database_url(url: str) -> Database:
    parsed = urlparse(url)
    if parsed.scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        dbname = unquote(parsed.path.lstrip("/"))
        if not dbname:
            raise SettingsError(f"{DATABASE_URL_ENV} names no database: {parsed.scheme}://...")
        try:
            port = parsed.port or 5432
        except ValueError as exc:
            raise SettingsError(f"{DATABASE_URL_ENV} has a bad port: {exc}") from None
        return Database(
            kind="postgres",
            host=parsed.hostname or "127.0.0.1",
            port=port,
            user=unquote(parsed.username or "postgres"),
            password=unquote(parsed.password or ""),
            dbname=dbname,
        )
    if parsed.scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else parsed.path
        if not path:
            raise SettingsError("a sqlite URL needs a path: sqlite:///path/to/file.db")
        return Database(kind="sqlite", sqlite_path=Path(path))
    raise SettingsError(
        f"{DATABASE_URL_ENV} must start with postgresql:// or sqlite:///, got {parsed.scheme!r}"
    )


def project_dir(explicit: str | Path | None = None) -> Path:
    raw = explicit or os.environ.get(PROJECT_ENV) or os.getcwd()
    return Path(raw).resolve()


def resolve_database(project: Path, url: str | None = None) -> Database:
    """``url`` or ``$STORYLINE_DATABASE_URL``, else the embedded SQLite file of the project."""
    url = url or os.environ.get(DATABASE_URL_ENV)
    if url:
        return parse_database_url(url)
    return Database(kind="sqlite", sqlite_path=project / ".storyline" / "storyline.db")
