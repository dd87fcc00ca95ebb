"""Fixtures that start real ``shardchat serve`` processes on port 0."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from shardchat import tokens

START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 15
LISTENING = re.compile(r"listening on http://(\[[^\]]+\]|[^:]+):(\d+)")


@dataclass
class Server:
    """A running server started by a test."""

    process: subprocess.Popen
    host: str
    port: int
    data_dir: Path
    secret: bytes
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def token(self, user_id: str, role: str) -> str:
        return tokens.mint(self.secret, user_id, role)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def stats(self) -> dict:
        status, body = self.get("/stats")
        assert status == 200, body
        return json.loads(body)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(tmp_path: Path, *extra: str, workers: int = 2) -> Server:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data_dir = tmp_path / "data"
    log_path = tmp_path / "server.log"
    log_file = open(log_path, "wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shardchat",
            "serve",
            "--workers",
            str(workers),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=log_file,
        text=True,
    )
    log_file.close()
    line = process.stdout.readline()
    match = LISTENING.search(line)
    if match is None:
        process.kill()
        process.wait()
        raise RuntimeError(f"server did not start: {line!r}\n{log_path.read_text()}")
    secret = tokens.load_secret(data_dir / "secret")
    return Server(
        process, match.group(1), int(match.group(2)), data_dir, secret, log_path
    )


def stop_server(server: Server) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        raise


@pytest.fixture(params=["wsproto", "trio-websocket"])
def ws_engine(request) -> str:
    return request.param


@pytest.fixture
def server(tmp_path, ws_engine):
    running = start_server(tmp_path, "--ws-engine", ws_engine)
    yield running
    status = stop_server(running)
    assert status == 0, running.log_text()[-4000:]


@pytest.fixture
def server_factory(tmp_path):
    started: list[Server] = []

    def factory(*extra: str, workers: int = 2) -> Server:
        running = start_server(tmp_path / f"s{len(started)}", *extra, workers=workers)
        started.append(running)
        return running

    yield factory
    for running in started:
        stop_server(running)
