"""Profile a worker under the reference workload with py-spy.

Runs ``shardchat bench --workers 1`` and attaches py-spy to the worker process
for the busy part of the run, then writes a flame graph (SVG) and the raw
collapsed stacks, and prints the functions with the most samples.

    python benchmarks/profile_worker.py --out benchmarks/results/profile
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
from pathlib import Path

SERVER_PID = re.compile(r"started server \(pid (\d+)\)")


def find_worker(server_pid: int, timeout_s: float = 30.0) -> int:
    """Return the pid of the supervisor's worker child once it exists."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        children = subprocess.run(
            ["ps", "--ppid", str(server_pid), "-o", "pid=,args="],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.splitlines()
        for line in children:
            pid, _, args = line.strip().partition(" ")
            if "shardchat.worker" in args:
                return int(pid)
        time.sleep(0.1)
    raise RuntimeError(f"no worker process under server pid {server_pid}")


def top_functions(collapsed: Path, count: int = 25) -> list[tuple[str, int]]:
    """Return the leaf frames with the most samples."""
    totals: collections.Counter[str] = collections.Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        totals[leaf] += int(samples)
    return totals.most_common(count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile"))
    parser.add_argument("--duration", type=int, default=15, help="seconds to sample")
    parser.add_argument("--ws-engine", default="wsproto")
    parser.add_argument("--students", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=50)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    bench = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shardchat",
            "bench",
            "--workers",
            "1",
            "--students",
            str(args.students),
            "--ws-engine",
            args.ws_engine,
            "--json",
            str(args.out / "bench.json"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    server_pid = None
    for line in bench.stderr:
        sys.stderr.write(line)
        match = SERVER_PID.search(line)
        if match:
            server_pid = int(match.group(1))
            break
    if server_pid is None:
        bench.wait()
        print("bench did not start a server", file=sys.stderr)
        return 1
    worker = find_worker(server_pid)
    py_spy = Path(sys.executable).with_name("py-spy")
    stem = args.out / f"worker-{args.ws_engine}"
    # Both recorders sample the same stretch of the run; with --nonblocking
    # they read the worker's memory without stopping it.
    recorders = [
        subprocess.Popen(
            [
                str(py_spy),
                "record",
                "--pid",
                str(worker),
                "--duration",
                str(args.duration),
                "--rate",
                "200",
                "--format",
                output_format,
                "--output",
                str(stem.with_suffix(suffix)),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for output_format, suffix in (("flamegraph", ".svg"), ("raw", ".txt"))
    ]
    for recorder in recorders:
        recorder.wait(timeout=args.duration + 60)
    for line in bench.stderr:
        sys.stderr.write(line)
    status = bench.wait()
    print(f"flame graph: {stem.with_suffix('.svg')}")
    for leaf, samples in top_functions(stem.with_suffix(".txt")):
        print(f"{samples:>7}  {leaf}")
    return status


if __name__ == "__main__":
    sys.exit(main())
