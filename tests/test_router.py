"""Router units: page files and the phoenix.js install hint."""

import socket

from router.server import ASSET_PATH, Router
from shardchat.ipc import Link


def make_router(pages_dir) -> Router:
    ours, _theirs = socket.socketpair()
    return Router([], Link(ours, "test"), b"s" * 32, pages_dir, {}, pages_dir=pages_dir)


async def test_router_phoenix_js_missing_gives_install_hint(tmp_path):
    router = make_router(tmp_path)
    answer = await router.phoenix_js_response()
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert f"run `npm ci --prefix {tmp_path}`".encode() in answer


async def test_router_phoenix_js_served_when_installed(tmp_path):
    script = tmp_path / "node_modules" / "phoenix" / "priv" / "static" / "phoenix.js"
    script.parent.mkdir(parents=True)
    script.write_text("var Phoenix = {};")
    answer = await make_router(tmp_path).phoenix_js_response()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Type: text/javascript" in answer
    assert answer.endswith(b"var Phoenix = {};")


def test_router_asset_path_serves_page_files_only():
    assert ASSET_PATH.match("/assets/pages.css")
    assert ASSET_PATH.match("/assets/student.js")
    assert ASSET_PATH.match("/assets/package.json") is None
    assert ASSET_PATH.match("/assets/.hidden.js") is None
    assert ASSET_PATH.match("/assets/../secret.js") is None
