"""Bearer tokens: who is calling (the actor events record) and what they may do.

Roles:

- ``read``: every GET.
- ``write``: read, plus creating stories and every transition except the operator ones.
- ``admin``: write, plus the operator transitions (:data:`OPERATOR_EVENTS`).
- ``agent`` (a per-story token from :class:`AgentTokens`): GET its own story and its
  history, and send only :data:`AGENT_EVENTS` to its own story.

Epics: ``write`` and ``admin`` create epics and send only the person events
(``domain.epic_transitions.PERSON_EVENTS``: block, unblock, fail, add_note); the rest are
the runners', which act in process, never over HTTP. A planner's agent token (scoped to an
epic id) reads only its own epic and sends only ``PLANNER_EVENTS`` to it.

Tokens come from ``[[server.tokens]]`` (inline ``token`` or ``token_env``) and from
``$STORYLINE_TOKENS`` (``token=actor:role,...``). With no configured token the API needs no
``Authorization`` header and requests act as ``user:local`` with the admin role; that is
only allowed on a loopback address (``storyline serve`` refuses anything else). A token that
is presented is always checked, so an agent's events record the agent even then.

Tokens are compared with :func:`hmac.compare_digest` and never logged or echoed.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from domain.config import ServerConfig, TokenConfig
from domain.epic_transitions import EPIC_EVENT_NAMES, PERSON_EVENTS, PLANNER_EVENTS
from service.agent_tokens import TOKEN_PREFIX, AgentGrant, AgentTokens

Role = Literal["read", "write", "admin", "agent"]
TOKENS_ENV = "STORYLINE_TOKENS"
ANONYMOUS_ACTOR = "user:local"

OPERATOR_EVENTS = frozenset(
    {"block", "unblock", "demote", "archive", "requeue_merge", "request_fixup"}
)
"""Transitions that override the pipeline: admin only."""

AGENT_EVENTS = frozenset(
    {"merge_resolved", "merge_gave_up", "add_note", "declare_dropped_hunk", "submit_review"}
)
"""The verdicts a mergemaster reports about its own story (with the hunks it dropped on
purpose), an evaluator's review verdict (only from an evaluator's token; the story refuses it
from any but its running evaluator attempt), and notes on it."""

_ACTOR = re.compile(r"[a-z]+:[A-Za-z0-9_.@-]+")
_RANKS = {"read": 1, "write": 2, "admin": 3}


class TokenError(ValueError):
    """The token configuration is unusable; the message names the entry (never the token)."""


@dataclass(frozen=True)
class Principal:
    """The caller of one request."""

    actor: str
    role: Role
    story_id: str | None = None
    """Set for agent tokens: the only story this caller may touch."""

    def at_least(self, role: Literal["read", "write", "admin"]) -> bool:
        return _RANKS.get(self.role, 0) >= _RANKS[role]


@dataclass(frozen=True)
class _Entry:
    token: bytes
    actor: str
    role: Literal["read", "write", "admin"]


class StaticTokens:
    """Configured tokens. Empty means the API runs without authentication (loopback only)."""

    def __init__(self, entries: Iterable[tuple[str, str, str]] = ()) -> None:
        self._entries: list[_Entry] = []
        for token, actor, role in entries:
            if role not in _RANKS:
                raise TokenError(f"token for {actor!r}: role must be read, write or admin")
            if not _ACTOR.fullmatch(actor):
                raise TokenError(f"token for {actor!r}: actor must look like 'user:name'")
            if len(token) < 16:
                raise TokenError(f"token for {actor!r} is shorter than 16 characters")
            if token.startswith(TOKEN_PREFIX):
                raise TokenError(f"token for {actor!r} must not start with {TOKEN_PREFIX!r}")
            self._entries.append(_Entry(token.encode(), actor, role))  # type: ignore[arg-type]

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token: str) -> Principal | None:
        presented = token.encode("utf-8", "surrogatepass")
        found: _Entry | None = None
        # Compare against every entry so the time taken does not reveal which one matched.
        for entry in self._entries:
            if hmac.compare_digest(entry.token, presented) and found is None:
                found = entry
        return Principal(found.actor, found.role) if found else None


def parse_tokens_env(value: str) -> list[tuple[str, str, str]]:
    """``token=actor:role,...``; the role is after the last ``:`` (actors contain one)."""
    entries = []
    for index, item in enumerate(part.strip() for part in value.split(",")):
        if not item:
            continue
        token, sep, rest = item.partition("=")
        actor, sep2, role = rest.rpartition(":")
        if not sep or not sep2 or not token:
            raise TokenError(f"{TOKENS_ENV} entry {index + 1} is not token=actor:role")
        entries.append((token.strip(), actor.strip(), role.strip()))
    return entries


def load_tokens(
    config: ServerConfig | Sequence[TokenConfig], environ: Mapping[str, str] | None = None
) -> StaticTokens:
    """The configured tokens, resolving ``token_env`` and adding ``$STORYLINE_TOKENS``."""
    env = os.environ if environ is None else environ
    configs = config.tokens if isinstance(config, ServerConfig) else list(config)
    entries: list[tuple[str, str, str]] = []
    for item in configs:
        if item.token is not None:
            entries.append((item.token, item.actor, item.role))
            continue
        assert item.token_env is not None
        value = env.get(item.token_env)
        if not value:
            raise TokenError(
                f"token for {item.actor!r}: environment variable {item.token_env} is not set"
            )
        entries.append((value, item.actor, item.role))
    if env.get(TOKENS_ENV):
        entries.extend(parse_tokens_env(env[TOKENS_ENV]))
    return StaticTokens(entries)


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address."""
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


class AuthFailure(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Authenticator:
    def __init__(
        self,
        static: StaticTokens,
        agent_tokens: AgentTokens | None = None,
        *,
        anonymous_actor: str = ANONYMOUS_ACTOR,
    ) -> None:
        self.static = static
        self.agent_tokens = agent_tokens
        self.anonymous = Principal(anonymous_actor, "admin")

    @property
    def required(self) -> bool:
        return bool(self.static)

    @staticmethod
    def bearer(header: str | None) -> str | None:
        if header is None:
            return None
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthFailure("invalid_token", "the Authorization header must be 'Bearer <token>'")
        return value.strip()

    def needs_database(self, token: str | None) -> bool:
        return token is not None and token.startswith(TOKEN_PREFIX)

    def authenticate(self, token: str | None) -> Principal:
        """The caller for ``token`` (an agent token costs one indexed database read)."""
        if token is None:
            if self.required:
                raise AuthFailure("unauthorized", "this API needs 'Authorization: Bearer <token>'")
            return self.anonymous
        if token.startswith(TOKEN_PREFIX):
            grant = self.agent_tokens.lookup(token) if self.agent_tokens else None
            if grant is None:
                raise AuthFailure("invalid_token", "the token is unknown, revoked or expired")
            return agent_principal(grant)
        principal = self.static.lookup(token)
        if principal is None:
            raise AuthFailure("invalid_token", "the token is unknown, revoked or expired")
        return principal


def agent_principal(grant: AgentGrant) -> Principal:
    return Principal(grant.actor, "agent", story_id=grant.story_id)


def may_read(principal: Principal, story_id: str | None = None) -> bool:
    """GETs: any role; an agent only its own story (``story_id`` None means a global view)."""
    if principal.role == "agent":
        return story_id is not None and story_id == principal.story_id
    return True


def may_create(principal: Principal) -> bool:
    return principal.at_least("write")


def may_transition(principal: Principal, story_id: str, event: str) -> bool:
    if principal.role == "agent":
        if event == "submit_review" and not principal.actor.startswith("agent:evaluator-"):
            return False  # a coder or mergemaster does not judge its own story
        return story_id == principal.story_id and event in AGENT_EVENTS
    if event in OPERATOR_EVENTS:
        return principal.at_least("admin")
    return principal.at_least("write")


def may_transition_epic(principal: Principal, epic_id: str, event: str) -> bool:
    """A planner's token: the planner events on its own epic. A person (write or admin):
    the person events, on any epic. An unknown event name is let through to the domain,
    which answers 422 with the known names (as for stories)."""
    if principal.role == "agent":
        return epic_id == principal.story_id and event in PLANNER_EVENTS
    if not principal.at_least("write"):
        return False
    return event in PERSON_EVENTS or event not in EPIC_EVENT_NAMES


__all__ = [
    "AGENT_EVENTS",
    "ANONYMOUS_ACTOR",
    "OPERATOR_EVENTS",
    "AgentGrant",
    "AgentTokens",
    "AuthFailure",
    "Authenticator",
    "Principal",
    "StaticTokens",
    "TokenError",
    "is_loopback",
    "load_tokens",
    "may_create",
    "may_read",
    "may_transition",
    "may_transition_epic",
    "parse_tokens_env",
]
