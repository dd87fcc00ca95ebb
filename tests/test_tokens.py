import os
import stat

import pytest

from shardchat import tokens
from shardchat.exceptions import ConfigurationError, TokenError

SECRET = bytes(range(32))


def test_tokens_round_trip_user():
    token = tokens.mint(SECRET, "s1", "student", now=1000)
    identity = tokens.verify(SECRET, token, now=1001)
    assert identity.user_id == "s1"
    assert identity.role == "student"
    assert identity.expires_at == 1000 + tokens.DEFAULT_TTL_S
    assert identity.chat_id is None


def test_tokens_round_trip_chat():
    token = tokens.mint(SECRET, "t1", "teacher", chat=("c9", "t1", "s4"), now=0)
    identity = tokens.verify(SECRET, token, now=1)
    assert identity.chat_id == "c9"
    assert identity.teacher_id == "t1"
    assert identity.student_id == "s4"


def test_tokens_forged_signature():
    token = tokens.mint(SECRET, "s1", "student")
    forged = tokens.mint(b"x" * 32, "s1", "student")
    body = token.split(".")[0]
    signature = forged.split(".")[1]
    with pytest.raises(TokenError, match="invalid token signature"):
        tokens.verify(SECRET, f"{body}.{signature}")


def test_tokens_tampered_payload():
    token = tokens.mint(SECRET, "s1", "student")
    other = tokens.mint(SECRET, "s2", "teacher")
    tampered = other.split(".")[0] + "." + token.split(".")[1]
    with pytest.raises(TokenError, match="invalid token signature"):
        tokens.verify(SECRET, tampered)


def test_tokens_expired():
    token = tokens.mint(SECRET, "s1", "student", ttl_s=10, now=100)
    with pytest.raises(TokenError, match="token expired"):
        tokens.verify(SECRET, token, now=111)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "malformed token: expected payload.signature"),
        ("abc", "malformed token: expected payload.signature"),
        ("abc.", "malformed token: expected payload.signature"),
        ("a.b!c", "malformed token: invalid base64url"),
    ],
)
def test_tokens_malformed(token, message):
    with pytest.raises(TokenError, match=message.replace(".", r"\.")):
        tokens.verify(SECRET, token)


def test_tokens_invalid_role_rejected_at_mint():
    with pytest.raises(ValueError, match="invalid role 'admin'"):
        tokens.mint(SECRET, "u", "admin")


def test_tokens_ensure_secret_mode_0600(tmp_path):
    path = tokens.ensure_secret(tmp_path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(tokens.load_secret(path)) == tokens.SECRET_BYTES
    # A second call keeps the existing secret.
    before = path.read_text()
    tokens.ensure_secret(tmp_path)
    assert path.read_text() == before


def test_tokens_load_secret_too_short(tmp_path):
    path = tmp_path / "secret"
    path.write_text("abcd\n")
    with pytest.raises(ConfigurationError, match="2 bytes, need at least 16"):
        tokens.load_secret(path)


def test_tokens_load_secret_not_hex(tmp_path):
    path = tmp_path / "secret"
    path.write_text("not hex at all\n")
    with pytest.raises(ConfigurationError, match="expected hex text"):
        tokens.load_secret(path)


def _signed(payload: dict) -> str:
    import base64
    import hashlib
    import hmac
    import json

    body = json.dumps(payload).encode()
    signature = hmac.new(SECRET, body, hashlib.sha256).digest()

    def encode(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{encode(body)}.{encode(signature)}"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([1, 2], "malformed token: payload is not an object"),
        ({"u": 5, "r": "student", "x": 10**9 * 5}, "malformed token: invalid user id"),
        ({"u": "", "r": "student", "x": 10**9 * 5}, "malformed token: invalid user id"),
        ({"u": "s", "r": "student", "x": "soon"}, "malformed token: invalid expiry"),
        ({"u": "s", "r": "student", "x": 1.5e9}, "malformed token: invalid expiry"),
        ({"u": "s", "r": "student", "x": 10**30}, "malformed token: invalid expiry"),
        ({"u": "s", "r": "admin", "x": 10**9 * 5}, "invalid token role 'admin'"),
        (
            {"u": "s", "r": "student", "x": 10**9 * 5, "c": "c1"},
            "malformed token: invalid chat fields",
        ),
    ],
)
def test_tokens_signed_but_invalid_payload(payload, message):
    with pytest.raises(TokenError) as info:
        tokens.verify(SECRET, _signed(payload), now=0)
    assert str(info.value) == message


def test_tokens_non_ascii_token_rejected():
    with pytest.raises(TokenError, match="malformed token: invalid base64url"):
        tokens.verify(SECRET, "é.é")


def test_tokens_mint_rejects_bad_ttl():
    with pytest.raises(ValueError, match="invalid ttl 0 s"):
        tokens.mint(SECRET, "s1", "student", ttl_s=0)
