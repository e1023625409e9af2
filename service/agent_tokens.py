"""Per-story agent tokens, stored durably as hashes.

A runner issues a token when it spawns an agent and puts it only in that agent's
environment (``STORYLINE_TOKEN``); the API accepts it for that story alone and only for the
agent's own verdict events. The table is shared, so a runner process and an API process on
another machine agree on which tokens are live; a revoked or expired token is refused at
once everywhere.

Tokens carry 256 random bits, so a plain SHA-256 is a sufficient hash (no salt or slow hash
needed: there is nothing to brute-force), and it lets the API look a token up by its hash.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from domain.ids import validate_story_id
from domain.stages import AgentRole
from service.sqlstore import SqlStore

if TYPE_CHECKING:
    from service.application import StorylineApplication

TABLE = "storyline_agent_tokens"
TOKEN_PREFIX = "sl_agent_"
"""Lets the API tell an agent token from a configured one without a database look-up, and
lets secret scanners recognise a leaked one."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def agent_actor(role: str, story_id: str, attempt: int) -> str:
    return f"agent:{role}-{story_id}-{attempt}"


@dataclass(frozen=True)
class AgentGrant:
    """What a live agent token allows: acting as ``actor`` on ``story_id`` only."""

    story_id: str
    attempt: int
    role: str
    actor: str


class AgentTokens:
    def __init__(self, app: StorylineApplication) -> None:
        self._sql = SqlStore(app)

    def issue(
        self,
        story_id: str,
        attempt: int,
        role: AgentRole | str,
        *,
        ttl_secs: float | None = None,
    ) -> str:
        """A new token for one agent run; only its hash is stored."""
        validate_story_id(story_id)
        role_name = AgentRole(role).value
        if not isinstance(attempt, int) or attempt < 1:
            raise ValueError("attempt must be a positive integer")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        self._sql.write(
            f"INSERT INTO {TABLE} (token_hash, story_id, attempt, role, actor, issued_at, "
            "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                hash_token(token),
                story_id,
                attempt,
                role_name,
                agent_actor(role_name, story_id, attempt),
                now,
                now + ttl_secs if ttl_secs is not None else None,
            ),
        )
        return token

    def revoke(self, token: str) -> bool:
        """Refuse ``token`` from now on; False if it was unknown or already revoked."""
        rows = self._sql.write(
            f"UPDATE {TABLE} SET revoked_at = ? WHERE token_hash = ? AND revoked_at IS NULL "
            "RETURNING token_hash",
            (time.time(), hash_token(token)),
        )
        return bool(rows)

    def revoke_story(self, story_id: str) -> int:
        """Revoke every live token of a story (e.g. when it leaves coding or merging)."""
        rows = self._sql.write(
            f"UPDATE {TABLE} SET revoked_at = ? WHERE story_id = ? AND revoked_at IS NULL "
            "RETURNING token_hash",
            (time.time(), story_id),
        )
        return len(rows)

    def lookup(self, token: str) -> AgentGrant | None:
        """The grant of a live token, or None (unknown, revoked or expired)."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        digest = hash_token(token)
        rows = self._sql.query(
            f"SELECT token_hash, story_id, attempt, role, actor, expires_at, revoked_at "
            f"FROM {TABLE} WHERE token_hash = ?",
            (digest,),
        )
        if not rows:
            return None
        row = rows[0]
        # The index found it; compare in constant time anyway so the check never depends on
        # how a database compares strings.
        if not hmac.compare_digest(str(row["token_hash"]), digest):
            return None
        if row["revoked_at"] is not None:
            return None
        if row["expires_at"] is not None and time.time() >= float(row["expires_at"]):
            return None
        return AgentGrant(
            story_id=str(row["story_id"]),
            attempt=int(row["attempt"]),
            role=str(row["role"]),
            actor=str(row["actor"]),
        )
