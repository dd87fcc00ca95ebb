"""The shardchat command's errors for bad input: one line, no traceback."""

import socket
import subprocess
import sys

from conftest import start_server, stop_server


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardchat", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_second_server_on_same_data_dir(tmp_path):
    server = start_server(tmp_path, workers=1)
    try:
        result = run_cli("serve", "--port", "0", "--data-dir", str(server.data_dir))
    finally:
        stop_server(server)
    assert result.returncode == 2
    assert f"data directory {server.data_dir} is in use by another shardchat serve" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_cli_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--port", str(port), "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_token_empty_user(tmp_path):
    (tmp_path / "secret").write_text("ab" * 32)
    result = run_cli(
        "token", "--user", "", "--role", "student", "--data-dir", str(tmp_path)
    )
    assert result.returncode == 2
    assert "invalid user id ''" in result.stderr


def test_cli_token_negative_ttl(tmp_path):
    (tmp_path / "secret").write_text("ab" * 32)
    result = run_cli(
        "token",
        "--user",
        "s1",
        "--role",
        "student",
        "--ttl",
        "-5",
        "--data-dir",
        str(tmp_path),
    )
    assert result.returncode == 2
    assert "invalid ttl -5 s" in result.stderr


def test_cli_token_binary_secret_file(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"\xff\xfe\x00binary")
    result = run_cli(
        "token", "--user", "s1", "--role", "student", "--secret-file", str(secret)
    )
    assert result.returncode == 2
    assert "expected hex text" in result.stderr


def test_cli_logs_missing_data_dir(tmp_path):
    result = run_cli("logs", "abc", "--data-dir", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "data directory not found" in result.stderr


def test_cli_token_round_trip(tmp_path):
    from shardchat import tokens

    (tmp_path / "secret").write_text("ab" * 32)
    result = run_cli(
        "token", "--user", "s1", "--role", "student", "--data-dir", str(tmp_path)
    )
    assert result.returncode == 0
    identity = tokens.verify(bytes.fromhex("ab" * 32), result.stdout.strip())
    assert identity.user_id == "s1"


def test_cli_socket_path_needs_slash(tmp_path):
    result = run_cli("serve", "--socket-path", "ws", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "invalid --socket-path 'ws': must start with /" in result.stderr
