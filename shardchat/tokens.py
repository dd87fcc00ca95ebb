"""Signed identity tokens.

A token is ``base64url(payload) "." base64url(HMAC-SHA256(secret, payload))``,
where the payload is compact JSON: ``u`` the user id, ``r`` the role
(``teacher`` or ``student``), ``x`` the expiry in Unix seconds and, for a
chat token, ``c`` the chat id together with ``t`` and ``s``, the teacher and
student of that chat. A worker can then admit the first join of a chat before
the matchmaker's notice of the chat reaches it, because the token itself says
who belongs to the chat.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import NamedTuple

from shardchat.exceptions import ConfigurationError, TokenError

ROLES = ("teacher", "student")
# The role of a connection admitted without a token in the development mode
# --insecure-join-identity: its join payloads name the user and role.
ANONYMOUS_ROLE = "anonymous"
DEFAULT_TTL_S = 24 * 3600
SECRET_BYTES = 32
SECRET_FILE_NAME = "secret"
MAX_ID_LENGTH = 128
# Expiry times past the year 9999 are rejected, which also keeps them within
# the 64-bit integers that msgpack carries between processes.
MAX_EXPIRY = 253402300799
MAX_TTL_S = 10 * 365 * 24 * 3600


class Identity(NamedTuple):
    """The verified content of a token."""

    user_id: str
    role: str
    expires_at: int
    chat_id: str | None = None
    teacher_id: str | None = None
    student_id: str | None = None


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    padding = "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(text + padding)


def mint(
    secret: bytes,
    user_id: str,
    role: str,
    *,
    ttl_s: int = DEFAULT_TTL_S,
    chat: tuple[str, str, str] | None = None,
    now: float | None = None,
) -> str:
    """Sign a token for ``user_id`` in ``role``.

    Args:
        chat: ``(chat_id, teacher_id, student_id)`` for a chat token.
        now: the current Unix time, for tests.
    """
    if role not in ROLES:
        raise ValueError(f"invalid role {role!r}: expected one of {ROLES}")
    if not user_id or len(user_id) > MAX_ID_LENGTH:
        raise ValueError(
            f"invalid user id {user_id!r}: must be 1 to {MAX_ID_LENGTH} characters"
        )
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"invalid ttl {ttl_s} s: must be 1 to {MAX_TTL_S} seconds")
    issued = time.time() if now is None else now
    payload: dict[str, object] = {"u": user_id, "r": role, "x": int(issued + ttl_s)}
    if chat is not None:
        payload["c"], payload["t"], payload["s"] = chat
    body = json.dumps(payload, separators=(",", ":")).encode()
    signature = hmac.new(secret, body, hashlib.sha256).digest()
    return f"{_b64encode(body)}.{_b64encode(signature)}"


def verify(secret: bytes, token: str, *, now: float | None = None) -> Identity:
    """Check a token's signature and expiry and return its identity.

    Raises:
        TokenError: the token is malformed, forged or expired.
    """
    body_text, dot, signature_text = token.partition(".")
    if not dot or not body_text or not signature_text:
        raise TokenError("malformed token: expected payload.signature")
    try:
        body = _b64decode(body_text)
        signature = _b64decode(signature_text)
    except (binascii.Error, ValueError) as exc:
        raise TokenError("malformed token: invalid base64url") from exc
    expected = hmac.new(secret, body, hashlib.sha256).digest()
    if not hmac.compare_digest(signature, expected):
        raise TokenError("invalid token signature")
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise TokenError("malformed token: invalid payload") from exc
    identity = _identity_from_payload(payload)
    current = time.time() if now is None else now
    if identity.expires_at < current:
        raise TokenError("token expired")
    return identity


def _identity_from_payload(payload: object) -> Identity:
    """Check the payload's fields and types; a signature alone proves no shape."""
    if not isinstance(payload, dict):
        raise TokenError("malformed token: payload is not an object")
    user_id = payload.get("u")
    role = payload.get("r")
    expires_at = payload.get("x")
    if not isinstance(user_id, str) or not user_id or len(user_id) > MAX_ID_LENGTH:
        raise TokenError("malformed token: invalid user id")
    if role not in ROLES:
        raise TokenError(f"invalid token role {role!r}")
    if type(expires_at) is not int or not 0 <= expires_at <= MAX_EXPIRY:
        raise TokenError("malformed token: invalid expiry")
    chat = [payload.get(key) for key in ("c", "t", "s")]
    if any(value is not None for value in chat) and not all(
        isinstance(value, str) and value and len(value) <= MAX_ID_LENGTH
        for value in chat
    ):
        raise TokenError("malformed token: invalid chat fields")
    return Identity(user_id, role, expires_at, *chat)


def load_secret(path: Path) -> bytes:
    """Read a secret file: hex text, at least 16 bytes once decoded."""
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read secret file {path}: {exc}") from exc
    except UnicodeDecodeError:
        raise ConfigurationError(
            f"invalid secret file {path}: expected hex text"
        ) from None
    try:
        secret = bytes.fromhex(text)
    except ValueError as exc:
        raise ConfigurationError(
            f"invalid secret file {path}: expected hex text"
        ) from exc
    if len(secret) < 16:
        raise ConfigurationError(
            f"invalid secret file {path}: {len(secret)} bytes, need at least 16"
        )
    return secret


def ensure_secret(data_dir: Path) -> Path:
    """Return the data directory's secret file, generating it (mode 0600) if missing."""
    path = data_dir / SECRET_FILE_NAME
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        # O_EXCL so two servers started on one directory cannot both write it.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_hex(SECRET_BYTES) + "\n")
    return path
