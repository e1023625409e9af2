"""Where the service keeps its data: the project directory and the database URL."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

DATABASE_URL_ENV = "STORYLINE_DATABASE_URL"
DATABASE_URL_FILE_ENV = "STORYLINE_DATABASE_URL_FILE"
"""A file holding the URL: keeps a password out of the command line and the environment."""
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

    def scrub(self, text: str) -> str:
        """``text`` (an error message, say) with this location's password masked."""
        if not self.password:
            return text
        from urllib.parse import quote

        for secret in {self.password, quote(self.password, safe="")}:
            text = text.replace(secret, "***")
        return text

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
        except ValueError:
            # Not the value: a password with an unescaped "/" or "#" lands here, and the
            # "port" then holds part of it.
            raise SettingsError(
                f"{DATABASE_URL_ENV} has a bad port (percent-encode any / # ? @ : "
                "in the user name or password)"
            ) from None
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


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``; anything else kept."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # The authority ends at the first "/" after the last "@" (a password may hold "/").
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostpart}"


def url_has_password(url: str) -> bool:
    return redact_url(url) != url


def read_url_file(path: str | Path) -> str:
    """The database URL kept in ``path`` (surrounding whitespace ignored)."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise SettingsError(f"cannot read the database URL file {path}: {reason}") from None
    if not text:
        raise SettingsError(f"the database URL file {path} is empty")
    return text


def resolve_database(
    project: Path, url: str | None = None, url_file: str | Path | None = None
) -> Database:
    """The first of: ``url``, the file ``url_file``, ``$STORYLINE_DATABASE_URL``, the file
    ``$STORYLINE_DATABASE_URL_FILE``; else the embedded SQLite file of the project."""
    if not url and url_file:
        url = read_url_file(url_file)
    url = url or os.environ.get(DATABASE_URL_ENV)
    if not url and os.environ.get(DATABASE_URL_FILE_ENV):
        url = read_url_file(os.environ[DATABASE_URL_FILE_ENV])
    if url:
        return parse_database_url(url)
    return Database(kind="sqlite", sqlite_path=project / ".storyline" / "storyline.db")
