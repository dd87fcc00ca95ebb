import pytest

from shardchat import http
from shardchat.exceptions import HandshakeError

HEAD = (
    b"GET /socket/websocket?vsn=2.0.0&token=abc&chat=c1 HTTP/1.1\r\n"
    b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Protocol: phoenix\r\nSec-WebSocket-Protocol: other\r\n\r\n"
)


def test_http_head_length():
    assert http.head_length(HEAD + b"extra") == len(HEAD)
    assert http.head_length(HEAD[:-2]) == 0


def test_http_parse_upgrade():
    request = http.parse_head(HEAD)
    assert request.method == "GET"
    assert request.path == "/socket/websocket"
    assert request.query == {"vsn": "2.0.0", "token": "abc", "chat": "c1"}
    assert request.is_websocket_upgrade()
    assert request.headers["sec-websocket-protocol"] == "phoenix, other"


def test_http_parse_plain_get_is_not_upgrade():
    request = http.parse_head(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not request.is_websocket_upgrade()


@pytest.mark.parametrize(
    ("head", "error"),
    [
        (b"GARBAGE\r\n\r\n", "invalid request line 'GARBAGE'"),
        (b"GET / HTTP/2\r\n\r\n", "invalid request line 'GET / HTTP/2'"),
        (b"GET nopath HTTP/1.1\r\n\r\n", "invalid request target 'nopath'"),
        (
            b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
            "invalid header line 'no colon here'",
        ),
        (b"GET / HTTP/1.1\r\n Folded: x\r\n\r\n", "invalid header line ' Folded: x'"),
    ],
)
def test_http_parse_malformed(head, error):
    with pytest.raises(HandshakeError) as info:
        http.parse_head(head)
    assert info.value.status == 400
    assert str(info.value) == error


def test_http_response_shape():
    data = http.text_response(404, "not found: /x")
    assert data.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"Content-Length: 14\r\n" in data
    assert data.endswith(b"\r\n\r\nnot found: /x\n")
