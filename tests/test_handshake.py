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


def response_head(status: str = "101 Switching Protocols", **headers: str) -> bytes:
    fields = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Accept": handshake.accept_value(KEY),
    }
    fields.update(headers)
    lines = [f"HTTP/1.1 {status}"]
    lines += [f"{name}: {value}" for name, value in fields.items() if value]
    return "\r\n".join(lines).encode()


def test_handshake_client_request_shape():
    request = handshake.client_request(
        "127.0.0.1:4000",
        "/socket/websocket?vsn=2.0.0",
        KEY,
        ["phoenix"],
        [("X-Test", "1")],
    )
    upgrade = handshake.check_upgrade(request)
    assert upgrade.key == KEY
    assert upgrade.request.subprotocols == ("phoenix",)
    assert ("x-test", "1") in upgrade.request.headers


def test_handshake_client_accepts_valid_response():
    assert handshake.check_response(response_head(), KEY, ()) is None
    selected = response_head(**{"Sec-WebSocket-Protocol": "phoenix"})
    assert handshake.check_response(selected, KEY, ["phoenix"]) == "phoenix"


@pytest.mark.parametrize(
    ("head", "status", "message"),
    [
        (response_head("403 Forbidden"), 403, "rejected with status 403"),
        (
            response_head(**{"Sec-WebSocket-Accept": "wrong"}),
            0,
            "wrong Sec-WebSocket-Accept",
        ),
        (response_head(**{"Upgrade": ""}), 0, "missing Upgrade: websocket"),
        (
            response_head(**{"Sec-WebSocket-Protocol": "other"}),
            0,
            "'other' was not offered",
        ),
        (b"SSH-2.0-OpenSSH", 0, "invalid handshake response"),
    ],
)
def test_handshake_client_rejects_response(head, status, message):
    with pytest.raises(HandshakeError) as info:
        handshake.check_response(head, KEY, ["phoenix"])
    assert info.value.status == status
    assert message in str(info.value)


def test_handshake_new_keys_are_valid_and_fresh():
    keys = {handshake.new_key() for _ in range(10)}
    assert len(keys) == 10
    for key in keys:
        assert (
            handshake.check_upgrade(handshake.client_request("h", "/", key)).key == key
        )
