"""Bearer tokens: agent tokens write reports as the agent ids they are bound to; read tokens query.

Tokens are kept only as sha256 digests. A presented token is hashed and compared with every known
digest by `hmac.compare_digest` (no early exit), so timing says nothing about any token. Deployments
hold tens to hundreds of tokens (one per rack or site, with agent-id patterns), so the scan is cheap.
An agent token cannot read and a read token cannot write (least privilege: a compromised host does not
get to see the fleet). Tokens never reach a log line; principals are named by `name` or digest prefix.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from .config import AuthConfig, TokenConfig

log = logging.getLogger("capmon.collector.auth")


@dataclass(frozen=True, slots=True)
class Principal:
    role: Literal["agent", "read"]
    name: str
    agents: tuple[str, ...] = ()

    def may_write_as(self, agent_id: str) -> bool:
        return self.role == "agent" and any(p == agent_id or fnmatchcase(agent_id, p) for p in self.agents)


class TokenStore:
    def __init__(self, auth: AuthConfig, env: Mapping[str, str]) -> None:
        self._tokens: list[tuple[bytes, Principal]] = []
        for role, tokens in (("agent", auth.agent_tokens), ("read", auth.read_tokens)):
            for tok in tokens:
                digest = self._digest_of(tok, env)
                name = tok.name or f"{role}-token-{digest.hex()[:8]}"
                self._tokens.append((digest, Principal(role, name, tok.agents)))  # type: ignore[arg-type]

    @staticmethod
    def _digest_of(tok: TokenConfig, env: Mapping[str, str]) -> bytes:
        if tok.sha256:
            return bytes.fromhex(tok.sha256)
        return hashlib.sha256(env[tok.env].encode()).digest()

    def __len__(self) -> int:
        return len(self._tokens)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal for an `Authorization: Bearer …` header value, or None."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for known, principal in self._tokens:
            if hmac.compare_digest(known, digest) and found is None:
                found = principal
        return found


def credentials_kind(authorization: str | None) -> str:
    """What a refused `Authorization` header was, for a log line: never any part of its value."""
    if not authorization:
        return "no token"
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "not a bearer token"
    return "unknown token"


class AuthFailureLog:
    """One log line per (token name, peer) per `interval_s` for refused requests, with how many
    were refused since that pair's last line; it names the token's configured name or "unknown
    token", never the token."""

    def __init__(self, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[tuple[str, str], list[float]] = {}

    def note(self, status: int, who: str, peer: str | None, what: str) -> bool:
        """Log (or count toward the next line); True when a line was written."""
        now = self.clock()
        key = (who, peer or "?")
        entry = self._last.get(key)
        if entry is not None and now - entry[0] < self.interval_s:
            entry[1] += 1
            return False
        more = int(entry[1]) if entry is not None else 0
        if entry is None and len(self._last) >= 10_000:
            self._last.clear()
        self._last[key] = [now, 0]
        log.warning(
            "%d %s from %s: %s%s",
            status,
            what,
            key[1],
            who,
            f" ({more} more since the last line)" if more else "",
        )
        return True
