import pytest

from shardchat.engines import handshake
from shardchat.exceptions import HandshakeError

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def head(**overrides: str) -> bytes:
    fields = {
        "Host": "127.0.0.1",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Protocol": "phoenix, other",
    }
    fields.update(overrides)
    lines = ["GET /socket/websocket?vsn=2.0.0 HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in fields.items() if value]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_handshake_accept_key_matches_rfc_6455_example():
    response = handshake.accept_response(KEY, None)
    # RFC 6455 section 1.3 gives this accept value for the sample key.
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Protocol" not in response


def test_handshake_selected_subprotocol_in_response():
    response = handshake.accept_response(KEY, "phoenix")
    assert response.endswith(b"Sec-WebSocket-Protocol: phoenix\r\n\r\n")


def test_handshake_request_fields():
    upgrade = handshake.check_upgrade(head())
    assert upgrade.key == KEY
    assert upgrade.request.path == "/socket/websocket"
    assert upgrade.request.query == {"vsn": "2.0.0"}
    assert upgrade.request.subprotocols == ("phoenix", "other")
    assert ("upgrade", "websocket") in upgrade.request.headers


@pytest.mark.parametrize(
    ("overrides", "status", "message"),
    [
        ({"Host": ""}, 400, "invalid upgrade request: missing Host header"),
        ({"Upgrade": ""}, 400, "invalid upgrade request: missing Upgrade: websocket"),
        ({"Sec-WebSocket-Version": "8"}, 426, "unsupported websocket version '8'"),
        ({"Sec-WebSocket-Key": "short"}, 400, "invalid Sec-WebSocket-Key"),
        ({"Sec-WebSocket-Key": ""}, 400, "invalid Sec-WebSocket-Key"),
    ],
)
def test_handshake_rejections(overrides, status, message):
    with pytest.raises(HandshakeError) as info:
        handshake.check_upgrade(head(**overrides))
    assert info.value.status == status
    assert message in str(info.value)


def test_handshake_426_names_supported_version():
    response = handshake.rejection_response(HandshakeError(426, "x"))
    assert response.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"Sec-WebSocket-Version: 13\r\n" in response
