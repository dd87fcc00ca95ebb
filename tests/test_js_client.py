"""The official phoenix.js client against real servers (tests/js, run by node)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

from conftest import Server, start_server, stop_server

JS_DIR = Path(__file__).resolve().parent / "js"
NPM_CI_TIMEOUT_S = 300
# The suite bounds each of its tests; this bounds node itself.
NPM_TEST_TIMEOUT_S = 300
# The idle server closes a connection after this many seconds without a frame.
IDLE_TIMEOUT_S = "1"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, (
        f"{name} is not installed: the phoenix.js suite needs Node.js 20 or newer "
        "with npm (for example `apt-get install -y nodejs npm`)"
    )
    return path


def run_npm(npm: str, *args: str, env: dict[str, str], timeout: int) -> str:
    """Run npm in tests/js; fail with its output when it exits non-zero.

    npm runs in its own process group, so that a timeout also ends the node
    process it started.
    """
    process = subprocess.Popen(
        [npm, *args],
        cwd=JS_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(
            f"npm {' '.join(args)} timed out after {timeout} s:\n{output}"
        ) from None
    assert process.returncode == 0, (
        f"npm {' '.join(args)} exited with {process.returncode}:\n{output}"
    )
    return output


def server_logs(*servers: Server) -> str:
    return "\n".join(
        f"--- server log {server.url}:\n{server.log_text()[-4000:]}"
        for server in servers
    )


def test_js_client_conformance(tmp_path, ws_engine):
    require_tool("node")
    npm = require_tool("npm")
    env = dict(os.environ)
    if not (JS_DIR / "node_modules").is_dir():
        run_npm(npm, "ci", "--no-audit", "--no-fund", env=env, timeout=NPM_CI_TIMEOUT_S)

    engine = ("--ws-engine", ws_engine)
    main = start_server(tmp_path / "main", *engine)
    try:
        idle = start_server(
            tmp_path / "idle", *engine, "--idle-timeout", IDLE_TIMEOUT_S
        )
    except BaseException:
        stop_server(main)
        raise
    try:
        env.update(
            SHARDCHAT_URL=main.url,
            SHARDCHAT_SECRET=main.secret.hex(),
            SHARDCHAT_IDLE_URL=idle.url,
            SHARDCHAT_IDLE_SECRET=idle.secret.hex(),
        )
        try:
            output = run_npm(
                npm,
                "test",
                "--",
                "--test-reporter=tap",
                env=env,
                timeout=NPM_TEST_TIMEOUT_S,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{server_logs(main, idle)}") from None
        # node exits 0 when it finds no test file at all.
        passed = re.search(r"^# pass (\d+)$", output, re.MULTILINE)
        assert passed is not None, output
        assert int(passed.group(1)) > 0, output
    finally:
        try:
            main_status = stop_server(main)
        finally:
            idle_status = stop_server(idle)
    assert main_status == 0, server_logs(main)
    assert idle_status == 0, server_logs(idle)
