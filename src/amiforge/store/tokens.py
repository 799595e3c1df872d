"""Tokens of the web console and API: a name, a role and the SHA-256 of the secret (the secret is never stored).

A token is looked up by the hash of what a request presents; a revoked token stays, so its name is never reused for
another secret and the audit log's actor names stay unambiguous.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from amiforge.errors import NotFound, StateError
from amiforge.model import ApiToken
from amiforge.store.base import StoreCore, inserted_id
from amiforge.store.rows import row_mapper
from amiforge.store.schema import api_sessions_table, api_tokens_table

token_from_row = row_mapper(ApiToken, "api_tokens", key="name")

_PUBLIC = [c for c in api_tokens_table.columns if c.name != "secret_sha256"]

# How stale `last_used_at` may get: a request writes it at most this often, so reads stay reads.
LAST_USED_EVERY = timedelta(minutes=1)


class Tokens(StoreCore):
    def add_token(self, name: str, role: str, secret_sha256: str, *, actor: str) -> ApiToken:
        """A new token; StateError if the name is taken (revoked tokens keep their names)."""
        now = self._now()
        with self._guard(f"create token {name}"), self._write() as conn:
            try:
                result = conn.execute(
                    api_tokens_table.insert().values(
                        name=name, role=role, secret_sha256=secret_sha256, created_at=now, created_by=actor
                    )
                )
            except IntegrityError as e:
                raise StateError(
                    f"a token named {name!r} exists (or existed: revoked names are not reused)",
                    fix="pick another name; `amiforge tokens list` shows them",
                ) from e
            return ApiToken(inserted_id(result), name, role, now, actor)

    def tokens(self) -> list[ApiToken]:
        """Every token, revoked ones too, oldest first."""
        with self._guard("list tokens"), self._read() as conn:
            return token_from_row.each(conn.execute(sa.select(*_PUBLIC).order_by(api_tokens_table.c.id)))

    def token_by_secret(self, secret_sha256: str) -> ApiToken | None:
        """The token whose secret hashes to this, revoked or not; its last use is recorded (at most once a minute)."""
        now = self._now()
        with self._guard("look up a token"), self._read() as conn:
            row = (
                conn.execute(sa.select(*_PUBLIC).where(api_tokens_table.c.secret_sha256 == secret_sha256))
                .mappings()
                .one_or_none()
            )
        if row is None:
            return None
        token = token_from_row(row)
        if token.revoked_at is None and (token.last_used_at is None or now - token.last_used_at >= LAST_USED_EVERY):
            with self._guard(f"note the use of token {token.name}"), self._write() as conn:
                touched = api_tokens_table.update().where(api_tokens_table.c.id == token.id)
                conn.execute(touched.values(last_used_at=now))
        return token

    def revoke_token(self, name: str) -> tuple[ApiToken, bool]:
        """Revoke the named token; (token, False) if it was already revoked."""
        now = self._now()
        with self._guard(f"revoke token {name}"), self._write() as conn:
            row = conn.execute(sa.select(*_PUBLIC).where(api_tokens_table.c.name == name)).mappings().one_or_none()
            if row is None:
                raise NotFound(f"no token named {name!r}", fix="`amiforge tokens list` shows them")
            token = token_from_row(row)
            if token.revoked_at is not None:
                return token, False
            conn.execute(api_tokens_table.update().where(api_tokens_table.c.id == token.id).values(revoked_at=now))
            return ApiToken(token.id, token.name, token.role, token.created_at, token.created_by, now,
                            token.last_used_at), True  # fmt: skip

    # browser sessions

    def add_session(self, token_id: int, secret_sha256: str, expires_at: datetime) -> None:
        """A session of the token, until `expires_at`; sessions that have ended are deleted on the way."""
        now = self._now()
        with self._guard("open a session"), self._write() as conn:
            conn.execute(api_sessions_table.delete().where(api_sessions_table.c.expires_at <= now))
            conn.execute(api_sessions_table.insert().values(
                secret_sha256=secret_sha256, token_id=token_id, created_at=now, expires_at=expires_at))  # fmt: skip

    def session_token(self, secret_sha256: str) -> ApiToken | None:
        """The token of the live session whose secret hashes to this (None: unknown or ended)."""
        s, t = api_sessions_table, api_tokens_table
        query = (
            sa.select(*_PUBLIC).join(s, s.c.token_id == t.c.id)
            .where(s.c.secret_sha256 == secret_sha256, s.c.expires_at > self._now())
        )  # fmt: skip
        with self._guard("look up a session"), self._read() as conn:
            row = conn.execute(query).mappings().one_or_none()
        return None if row is None else token_from_row(row)

    def end_session(self, secret_sha256: str) -> bool:
        with self._guard("end a session"), self._write() as conn:
            done = conn.execute(api_sessions_table.delete().where(api_sessions_table.c.secret_sha256 == secret_sha256))
            return done.rowcount == 1
