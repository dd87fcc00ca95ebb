"""Measure how shardchat's reference workload scales with worker processes.

Each round runs ``shardchat bench`` once per worker count and websocket engine,
so the runs interleave (1, 2, 1, 2, ...) and load from other programs on the
machine spreads over every setting. Each round starts with ``benchmarks/floor.py``,
which relays the same message pattern through a bare trio server. Wall times on a shared machine are noisy, so the figures to compare are server
CPU per relayed message and ratios taken within one round.

Writes scaling.json (machine, every run, medians per setting), scaling.md (a
table) and scaling.png (relays per second and server CPU per relay against
workers) to --out.

    python benchmarks/scaling.py --workers 1,2 --repeat 3 --out benchmarks/results/latest
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from floor import check_cpu_list

from shardchat.bench import runner
from shardchat.websocket import ENGINES

# Seconds a bench process may run past its own --timeout: the log check and
# stopping the server come after it.
BENCH_GRACE_S = 60.0
FLOOR_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
PROJECTED_WORKERS = (8, 16)
ROLES = ("router", "matchmaker", "workers")
FLOOR_SCRIPT = Path(__file__).resolve().with_name("floor.py")


class PinningMethod(enum.Enum):
    """The mechanism that keeps the server and the bots on the requested CPUs."""

    NONE = "none"
    BENCH_OPTIONS = "shardchat bench --server-cpus/--client-cpus"
    TASKSET = "taskset -c around the whole bench"


@dataclasses.dataclass(frozen=True)
class Pinning:
    """The CPU pinning of every bench and floor run."""

    method: PinningMethod
    server_cpus: str | None = None
    client_cpus: str | None = None
    # Commands are prefixed with this, e.g. ("taskset", "-c", "0,1").
    prefix: tuple[str, ...] = ()
    # Options added to both the bench and the floor command lines.
    options: tuple[str, ...] = ()
    note: str | None = None
    server_cpu_count: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method.value,
            "server_cpus": self.server_cpus,
            "client_cpus": self.client_cpus,
            "command_prefix": list(self.prefix),
            "note": self.note,
        }


# Options and machine.


def parse_worker_counts(text: str) -> list[int]:
    """Parse "1,2,4" into worker counts, in the given order.

    Raises:
        argparse.ArgumentTypeError: a count is not a positive integer.
    """
    counts = []
    for part in text.split(","):
        if not part.strip().isdigit() or int(part) < 1:
            raise argparse.ArgumentTypeError(
                f"invalid worker count {part!r} in {text!r}: expected e.g. '1,2,4'"
            )
        counts.append(int(part))
    return list(dict.fromkeys(counts))


def parse_engines(text: str) -> list[str]:
    """Parse "wsproto,trio-websocket" into engine names.

    Raises:
        argparse.ArgumentTypeError: a name is not a known engine.
    """
    engines = [part.strip() for part in text.split(",")]
    for engine in engines:
        if engine not in ENGINES:
            raise argparse.ArgumentTypeError(
                f"unknown websocket engine {engine!r}, expected one of {ENGINES}"
            )
    return list(dict.fromkeys(engines))


def bench_has_pinning_options() -> bool:
    """Return whether ``shardchat bench --help`` lists --server-cpus and --client-cpus."""
    result = subprocess.run(
        [sys.executable, "-m", "shardchat", "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return "--server-cpus" in result.stdout and "--client-cpus" in result.stdout


def plan_pinning(
    parser: argparse.ArgumentParser, server_cpus: str | None, client_cpus: str | None
) -> Pinning:
    """Check the CPU lists and decide how to pin the runs to them."""
    usable = os.sched_getaffinity(0)
    if server_cpus is None and client_cpus is None:
        return Pinning(PinningMethod.NONE, server_cpu_count=len(usable))

    chosen: dict[str, set[int]] = {}
    for option, text in (
        ("--server-cpus", server_cpus),
        ("--client-cpus", client_cpus),
    ):
        cpus = check_cpu_list(parser, option, text)
        if cpus is not None:
            chosen[option] = cpus

    if bench_has_pinning_options():
        options: list[str] = []
        for option, text in (
            ("--server-cpus", server_cpus),
            ("--client-cpus", client_cpus),
        ):
            if text is not None:
                options += [option, text]
        server_set = chosen.get("--server-cpus", usable)
        return Pinning(
            PinningMethod.BENCH_OPTIONS,
            server_cpus,
            client_cpus,
            options=tuple(options),
            server_cpu_count=len(server_set),
        )

    if shutil.which("taskset") is None:
        parser.error("cannot pin CPUs: taskset is not installed (util-linux)")
    union = sorted(set().union(*chosen.values()))
    cpu_list = ",".join(str(cpu) for cpu in union)
    note = (
        f"shardchat bench has no --server-cpus/--client-cpus options, so each bench "
        f"(server and bots together) and each floor run is pinned with "
        f"'taskset -c {cpu_list}': server and clients share these CPUs"
    )
    return Pinning(
        PinningMethod.TASKSET,
        server_cpus,
        client_cpus,
        prefix=("taskset", "-c", cpu_list),
        note=note,
        server_cpu_count=len(union),
    )


def read_cpu_model() -> str:
    """Return the first "model name" of /proc/cpuinfo, or the platform's guess."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_model": read_cpu_model(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "trio": importlib.metadata.version("trio"),
        "shardchat": importlib.metadata.version("shardchat"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_start": list(os.getloadavg()),
    }


# Running one bench or floor process.


def run_logged(argv: list[str], log_path: Path, timeout_s: float) -> int | None:
    """Run a command with its output in log_path; return its status, None on timeout.

    The command gets its own process group, which is stopped by its id in every
    case: SIGTERM, then SIGKILL after STOP_TIMEOUT_S.
    """
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        finally:
            stop_group(process)


def stop_group(process: subprocess.Popen[Any]) -> None:
    """Stop the process group led by process until none of its members is alive.

    Sends SIGTERM, then SIGKILL after STOP_TIMEOUT_S. Members that outlived the
    leader count too, because a bench leaves its server and bots in its group.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None and not live_group_members(process.pid):
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None and not live_group_members(process.pid):
                return
            time.sleep(0.1)


def live_group_members(group: int) -> list[int]:
    """Return the pids in a process group that are not zombies, read from /proc."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as file:
                fields = file.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp.
        if int(fields[2]) == group and fields[0] != b"Z":
            members.append(int(entry.name))
    return members


def flatten_options(options: dict[str, object]) -> list[str]:
    return [text for name, value in options.items() for text in (name, str(value))]


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text().strip().splitlines()[-lines:])
    except OSError:
        return ""


def run_bench(
    args: argparse.Namespace, pinning: Pinning, workers: int, engine: str, stem: str
) -> dict[str, Any]:
    """Run one bench and return its record (see record_bench)."""
    runs_dir = args.out / "runs"
    json_path = runs_dir / f"{stem}.json"
    log_path = runs_dir / f"{stem}.log"
    options = {
        "--workers": workers,
        "--ws-engine": engine,
        "--students": args.students,
        "--teachers": args.teachers,
        "--per-teacher": args.per_teacher,
        "--messages": args.messages,
        "--client-processes": args.client_processes,
        "--timeout": args.timeout,
        "--json": json_path,
    }
    argv = [*pinning.prefix, sys.executable, "-m", "shardchat", "bench"]
    argv += [*flatten_options(options), "--quiet", *pinning.options]

    json_path.unlink(missing_ok=True)
    status = run_logged(argv, log_path, args.timeout + BENCH_GRACE_S)
    record = record_bench(read_json(json_path), status)
    record.update(
        workers=workers,
        engine=engine,
        bench_json=str(json_path.relative_to(args.out)),
        log=str(log_path.relative_to(args.out)),
    )
    if not record["ok"]:
        # One line, because it goes into a progress line and a list item.
        record["error"] = " ".join(describe_failure(status, record, log_path).split())
    return record


def describe_failure(status: int | None, record: dict[str, Any], log_path: Path) -> str:
    if status is None:
        reason = "timed out"
    elif status != 0:
        reason = f"exited with status {status}"
    else:
        reason = "reported ok false"
    problems = record.get("problems") or []
    detail = "; ".join(str(problem) for problem in problems[:3]) or tail(log_path)
    return f"{reason}: {detail}" if detail else reason


def record_bench(bench: dict[str, Any] | None, status: int | None) -> dict[str, Any]:
    """Turn a bench summary into one run record; missing figures are None."""
    ok = status == 0 and bench is not None and bench.get("ok") is True
    record: dict[str, Any] = {"ok": ok, "returncode": status}
    if bench is None:
        return record

    relays = bench.get("relayed_messages") or 0
    cpu = bench.get("server_cpu_s") or {}
    by_role = {
        role: cpu[role] / relays * 1e6 if relays and role in cpu else None
        for role in ROLES
    }
    # The router and the matchmaker are single processes at any worker count.
    total = cpu.get("total")
    serial = None
    if total:
        serial = (cpu.get("router", 0.0) + cpu.get("matchmaker", 0.0)) / total

    latency = bench.get("latency_ms") or {}
    record.update(
        wall_s=bench.get("wall_s"),
        relayed_messages=relays,
        chats_verified=bench.get("chats_verified"),
        chats_expected=bench.get("chats_expected"),
        relays_per_s=bench.get("relays_per_s"),
        server_cpu_s=cpu,
        server_cpu_us_per_relay=bench.get("server_cpu_us_per_relay"),
        cpu_us_per_relay_by_role=by_role,
        client_cpu_s=bench.get("client_cpu_s"),
        latency_ms={"p50": latency.get("p50"), "p99": latency.get("p99")},
        serial_share=serial,
        problems=bench.get("problems") or [],
    )
    return record


def run_floor(args: argparse.Namespace, pinning: Pinning, stem: str) -> dict[str, Any]:
    """Run floor.py with the workload's chat pattern and return its record."""
    runs_dir = args.out / "runs"
    json_path = runs_dir / f"{stem}.json"
    log_path = runs_dir / f"{stem}.log"
    options = {
        "--pairs": args.students,
        "--messages": args.messages,
        "--concurrent": args.teachers * args.per_teacher,
        "--json": json_path,
    }
    argv = [*pinning.prefix, sys.executable, str(FLOOR_SCRIPT)]
    argv += [*flatten_options(options), *pinning.options]

    json_path.unlink(missing_ok=True)
    status = run_logged(argv, log_path, FLOOR_TIMEOUT_S)
    floor = read_json(json_path)
    ok = status == 0 and floor is not None and floor.get("ok") is True
    record: dict[str, Any] = {
        "ok": ok,
        "returncode": status,
        "floor_json": str(json_path.relative_to(args.out)),
        "log": str(log_path.relative_to(args.out)),
    }
    if floor is not None:
        record.update(
            server_cpu_us_per_relay=floor.get("server_cpu_us_per_relay"),
            server_cpu_s=floor.get("server_cpu_s"),
            relayed_messages=floor.get("relayed_messages"),
            wall_s=floor.get("wall_s"),
            relays_per_s=floor.get("relays_per_s"),
        )
    if not ok:
        reason = "timed out" if status is None else f"exited with status {status}"
        record["error"] = " ".join(f"{reason}: {tail(log_path)}".split())
    return record


# Summaries.


def median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def amdahl_speedup(serial_share: float, workers: int) -> float:
    """Return Amdahl's speedup at ``workers`` for a serial fraction of the CPU."""
    return 1.0 / (serial_share + (1.0 - serial_share) / workers)


def round_ratios(
    runs: list[dict[str, Any]], base: dict[int, dict[str, Any]], key: str, invert: bool
) -> float | None:
    """Return the median over rounds of runs[key] / base[key] (or its inverse).

    Each run is compared with the base worker count's run of its own round, so
    that slow stretches on a shared machine cancel out.
    """
    values = []
    for run in runs:
        reference = base.get(run["round"])
        if reference is None:
            continue
        pair = (reference[key], run[key]) if invert else (run[key], reference[key])
        values.append(ratio(*pair))
    return median(values)


def summarize_setting(
    runs: list[dict[str, Any]],
    base: dict[int, dict[str, Any]],
    floor_us: float | None,
) -> dict[str, Any]:
    """Return the medians over the successful runs of one worker count and engine."""
    us_per_relay = median([run["server_cpu_us_per_relay"] for run in runs])
    serial = median([run["serial_share"] for run in runs])
    projected = None
    if serial is not None:
        projected = {str(n): amdahl_speedup(serial, n) for n in PROJECTED_WORKERS}
    return {
        "runs": len(runs),
        "wall_s": median([run["wall_s"] for run in runs]),
        "relays_per_s": median([run["relays_per_s"] for run in runs]),
        "server_cpu_us_per_relay": us_per_relay,
        "cpu_us_per_relay_by_role": {
            role: median([run["cpu_us_per_relay_by_role"][role] for run in runs])
            for role in ROLES
        },
        "floor_us_per_relay": floor_us,
        "floor_ratio": ratio(us_per_relay, floor_us),
        "serial_share": serial,
        "projected_speedup": projected,
        "latency_ms": {
            "p50": median([run["latency_ms"]["p50"] for run in runs]),
            "p99": median([run["latency_ms"]["p99"] for run in runs]),
        },
        "client_cpu_s": median([run["client_cpu_s"] for run in runs]),
        "relays_per_server_cpu_s": ratio(1e6, us_per_relay),
        # Relays per server-CPU second relative to the base worker count.
        "relays_per_server_cpu_s_relative": round_ratios(
            runs, base, "server_cpu_us_per_relay", invert=True
        ),
        "relays_per_s_relative": round_ratios(runs, base, "relays_per_s", invert=False),
    }


def summarize_engine(
    runs: list[dict[str, Any]],
    engine: str,
    worker_counts: list[int],
    floor_us: float | None,
) -> dict[str, dict[str, Any]]:
    """Return one engine's summaries keyed by worker count (as a string)."""
    done = [run for run in runs if run["ok"] and run["engine"] == engine]
    base_workers = min(worker_counts)
    base = {run["round"]: run for run in done if run["workers"] == base_workers}
    summary = {}
    for workers in worker_counts:
        setting = [run for run in done if run["workers"] == workers]
        if setting:
            summary[str(workers)] = summarize_setting(setting, base, floor_us)
    return summary


def build_document(
    args: argparse.Namespace,
    machine: dict[str, Any],
    pinning: Pinning,
    runs: list[dict[str, Any]],
    floors: list[dict[str, Any]],
) -> dict[str, Any]:
    floor_us = median([f["server_cpu_us_per_relay"] for f in floors if f["ok"]])
    engines = {
        engine: summarize_engine(runs, engine, args.workers, floor_us)
        for engine in args.engines
    }
    document: dict[str, Any] = {
        "machine": machine,
        "workload": {
            "students": args.students,
            "teachers": args.teachers,
            "per_teacher": args.per_teacher,
            "messages_per_chat": args.messages,
            "client_processes": args.client_processes,
        },
        "workers": args.workers,
        "base_workers": min(args.workers),
        "engines_run": args.engines,
        "repeat": args.repeat,
        "pinning": pinning.to_json(),
        "floor": {"us_per_relay": floor_us, "runs": floors},
        "runs": runs,
        "summary_engine": args.engines[0],
        "summary": engines[args.engines[0]],
    }
    if len(args.engines) > 1:
        document["engines"] = engines
    return document


# Output files.


def describe_machine_line(machine: dict[str, Any]) -> str:
    load = ", ".join(f"{value:.2f}" for value in machine["load_average_start"])
    return (
        f"{machine['cores']} cores ({machine['usable_cores']} usable), "
        f"{machine['cpu_model']}, Python {machine['python']}, trio {machine['trio']}, "
        f"{machine['platform']}, {machine['date']}, load average at start {load}"
    )


def describe_floor_line(document: dict[str, Any]) -> str:
    floor_us = document["floor"]["us_per_relay"]
    count = sum(1 for run in document["floor"]["runs"] if run["ok"])
    if floor_us is None:
        return "trio floor: not measured"
    return (
        f"trio floor: {floor_us:.1f} us server CPU per relayed message (bare trio "
        f"sockets, length-prefixed frames, same chat pattern; median of {count})"
    )


def engine_summaries(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return the summaries keyed by engine, also when only one engine ran."""
    return document.get("engines") or {document["summary_engine"]: document["summary"]}


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def cell(value: float | None, template: str) -> str:
    return "-" if value is None else template.format(value)


TABLE_HEADER = (
    "| engine | workers | runs | wall s | relays/s | relays/s vs base "
    "| server CPU us/relay | router | matchmaker | workers | x floor "
    "| relays per CPU-s vs base | serial share | Amdahl 8 | Amdahl 16 "
    "| p50 ms | p99 ms | client CPU s |"
)


def table_rows(document: dict[str, Any]) -> list[str]:
    engines = engine_summaries(document)
    rows = [TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"]
    for engine, summary in engines.items():
        for workers, s in summary.items():
            roles = s["cpu_us_per_relay_by_role"]
            projected = s["projected_speedup"] or {}
            cells = [
                engine,
                workers,
                str(s["runs"]),
                cell(s["wall_s"], "{:.1f}"),
                cell(s["relays_per_s"], "{:.0f}"),
                cell(s["relays_per_s_relative"], "{:.2f}x"),
                cell(s["server_cpu_us_per_relay"], "{:.1f}"),
                cell(roles["router"], "{:.1f}"),
                cell(roles["matchmaker"], "{:.1f}"),
                cell(roles["workers"], "{:.1f}"),
                cell(s["floor_ratio"], "{:.2f}x"),
                cell(s["relays_per_server_cpu_s_relative"], "{:.2f}x"),
                cell(s["serial_share"], "{:.1%}"),
                cell(projected.get("8"), "{:.2f}"),
                cell(projected.get("16"), "{:.2f}"),
                cell(s["latency_ms"]["p50"], "{:.1f}"),
                cell(s["latency_ms"]["p99"], "{:.1f}"),
                cell(s["client_cpu_s"], "{:.1f}"),
            ]
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def write_markdown(path: Path, document: dict[str, Any]) -> None:
    workload = document["workload"]
    relays = workload["students"] * workload["messages_per_chat"] * 2
    base = document["base_workers"]
    lines = [
        "# shardchat per-core scaling",
        "",
        f"Machine: {describe_machine_line(document['machine'])}.",
        "",
        f"Workload: {workload['students']} students, {workload['teachers']} teachers "
        f"x {workload['per_teacher']} chats, {workload['messages_per_chat']} messages "
        f"each side per chat ({relays} relayed messages), "
        f"{plural(document['repeat'], 'round')}, medians over the rounds.",
        "",
        describe_floor_line(document) + ".",
        "",
    ]
    pinning = document["pinning"]
    if pinning["method"] != PinningMethod.NONE.value:
        note = f" {pinning['note']}." if pinning["note"] else ""
        lines += [f"Pinning: {pinning['method']}.{note}", ""]

    lines += table_rows(document)
    lines += [
        "",
        f'"vs base" columns are medians of ratios to the {base}-worker run of the '
        "same round. Serial share is (router + matchmaker CPU) / server CPU. "
        "Amdahl n is 1 / (s + (1 - s) / n) for that serial share s, which assumes "
        "that worker CPU divides evenly over n workers while the router and the "
        "matchmaker stay single processes.",
    ]

    failed = [run for run in document["runs"] if not run["ok"]]
    failed += [run for run in document["floor"]["runs"] if not run["ok"]]
    if failed:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {run.get('log')}: {run.get('error')}" for run in failed]
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, document: dict[str, Any]) -> None:
    """Draw relays per second and server CPU per relay against workers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = engine_summaries(document)
    figure, (rate_axes, cpu_axes) = plt.subplots(1, 2, figsize=(11, 4.5))
    for engine, summary in engines.items():
        workers = [int(key) for key in summary]
        runs = [
            run for run in document["runs"] if run["ok"] and run["engine"] == engine
        ]
        for axes, key in (
            (rate_axes, "relays_per_s"),
            (cpu_axes, "server_cpu_us_per_relay"),
        ):
            line = axes.plot(
                workers,
                [summary[str(w)][key] for w in workers],
                marker="o",
                label=engine,
            )[0]
            axes.scatter(
                [run["workers"] for run in runs],
                [run[key] for run in runs],
                color=line.get_color(),
                alpha=0.35,
                s=14,
            )

    floor_us = document["floor"]["us_per_relay"]
    if floor_us is not None:
        cpu_axes.axhline(
            floor_us,
            color="grey",
            linestyle="--",
            label=f"trio floor {floor_us:.1f} us",
        )
    rate_axes.set_title("throughput (median, dots: runs)")
    rate_axes.set_ylabel("relayed messages per second")
    cpu_axes.set_title("server CPU per relayed message")
    cpu_axes.set_ylabel("microseconds")
    for axes in (rate_axes, cpu_axes):
        axes.set_xlabel("worker processes")
        axes.set_xticks(document["workers"])
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend()
    machine = document["machine"]
    figure.suptitle(
        f"shardchat scaling: {machine['usable_cores']} usable cores, "
        f"{machine['cpu_model']}, {machine['date']}",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(out: Path, document: dict[str, Any], with_plot: bool) -> None:
    (out / "scaling.json").write_text(json.dumps(document, indent=2) + "\n")
    write_markdown(out / "scaling.md", document)
    if with_plot:
        write_plot(out / "scaling.png", document)


# Console output.


def describe_floor(record: dict[str, Any]) -> str:
    if not record["ok"]:
        return f"FAILED, {record.get('error')}"
    return (
        f"ok, {record['server_cpu_us_per_relay']:.1f} us server CPU/relay, "
        f"{record['wall_s']:.1f} s, {record['relays_per_s']:.0f} relays/s"
    )


def describe_run(record: dict[str, Any]) -> str:
    if not record["ok"]:
        return f"FAILED, {record.get('error')}"
    roles = record["cpu_us_per_relay_by_role"]
    text = (
        f"ok, {cell(record['wall_s'], '{:.1f}')} s, "
        f"{cell(record['relays_per_s'], '{:.0f}')} relays/s, "
        f"{cell(record['server_cpu_us_per_relay'], '{:.1f}')} us server CPU/relay "
        f"(router {cell(roles['router'], '{:.1f}')}, "
        f"matchmaker {cell(roles['matchmaker'], '{:.1f}')}, "
        f"workers {cell(roles['workers'], '{:.1f}')}), "
        f"serial share {cell(record['serial_share'], '{:.1%}')}, "
        f"client CPU {cell(record['client_cpu_s'], '{:.1f}')} s, "
        f"p50 {cell(record['latency_ms']['p50'], '{:.1f}')} ms, "
        f"p99 {cell(record['latency_ms']['p99'], '{:.1f}')} ms"
    )
    if record.get("floor_ratio") is not None:
        text += f", {record['floor_ratio']:.2f}x floor"
    return text


def print_findings(document: dict[str, Any]) -> None:
    base = document["base_workers"]
    engines = engine_summaries(document)
    print()
    for engine, summary in engines.items():
        for workers, s in summary.items():
            projected = s["projected_speedup"]
            print(
                f"{engine}, {plural(int(workers), 'worker')}: relays per server-CPU "
                "second "
                f"{cell(s['relays_per_server_cpu_s'], '{:.0f}')}, "
                f"{cell(s['relays_per_server_cpu_s_relative'], '{:.2f}x')} of "
                f"{plural(base, 'worker')}; relays/s "
                f"{cell(s['relays_per_s_relative'], '{:.2f}x')} of "
                f"{plural(base, 'worker')}; "
                f"serial share {cell(s['serial_share'], '{:.1%}')}; Amdahl speedup "
                f"{cell(projected and projected['8'], '{:.2f}')} at 8 workers, "
                f"{cell(projected and projected['16'], '{:.2f}')} at 16 workers"
            )
    print()
    print(describe_floor_line(document))
    print()
    print("\n".join(table_rows(document)))


# Main.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workers",
        type=parse_worker_counts,
        help="comma-separated worker counts, e.g. 1,2,4 (default: 1 up to the "
        "usable cores, or the server CPUs when pinned)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds over every setting (default: 3)"
    )
    parser.add_argument(
        "--engines",
        type=parse_engines,
        default=["wsproto"],
        help=f"comma-separated websocket engines out of {', '.join(ENGINES)} "
        "(default: wsproto)",
    )

    parser.add_argument(
        "--out", type=Path, required=True, help="directory for the results"
    )

    parser.add_argument(
        "--server-cpus", help="CPU list for the server, e.g. '0-3' or '4,5'"
    )
    parser.add_argument(
        "--client-cpus", help="CPU list for the bots, e.g. '0-3' or '4,5'"
    )

    runner.add_workload_arguments(parser)
    parser.add_argument(
        "--client-processes",
        type=int,
        default=2,
        help="bot processes of each bench (default: 2)",
    )

    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds allowed for one bench, passed to shardchat bench (default: 300)",
    )
    return parser


def parse_arguments(argv: list[str] | None) -> tuple[argparse.Namespace, Pinning]:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("repeat", "students", "teachers", "per_teacher", "messages"):
        if getattr(args, name) < 1:
            option = "--" + name.replace("_", "-")
            parser.error(f"invalid {option} {getattr(args, name)}: must be at least 1")
    try:
        import matplotlib  # noqa: F401 - checked before minutes of runs
    except ImportError:
        parser.error("matplotlib is missing: pip install -e '.[bench]'")
    pinning = plan_pinning(parser, args.server_cpus, args.client_cpus)
    if args.workers is None:
        args.workers = list(range(1, pinning.server_cpu_count + 1))
    return args, pinning


def run_rounds(
    args: argparse.Namespace,
    pinning: Pinning,
    machine: dict[str, Any],
    runs: list[dict[str, Any]],
    floors: list[dict[str, Any]],
) -> bool:
    """Run every round, appending to runs and floors, until the first failure.

    Returns whether every run succeeded. scaling.json and scaling.md are
    rewritten after each bench run, so an interrupted series leaves its results.
    """
    steps = args.repeat * (1 + len(args.workers) * len(args.engines))
    step = 0
    for round_number in range(1, args.repeat + 1):
        step += 1
        floor = run_floor(args, pinning, f"r{round_number}-floor")
        floor["round"] = round_number
        floors.append(floor)
        print(
            f"[{step}/{steps}] round {round_number}, trio floor: {describe_floor(floor)}",
            flush=True,
        )
        if not floor["ok"]:
            return False

        for workers in args.workers:
            for engine in args.engines:
                step += 1
                stem = f"r{round_number}-w{workers}-{engine}"
                record = run_bench(args, pinning, workers, engine, stem)
                record["round"] = round_number
                record["floor_ratio"] = ratio(
                    record.get("server_cpu_us_per_relay"),
                    floor["server_cpu_us_per_relay"],
                )
                runs.append(record)
                print(
                    f"[{step}/{steps}] round {round_number}, "
                    f"{plural(workers, 'worker')}, "
                    f"{engine}: {describe_run(record)}",
                    flush=True,
                )
                document = build_document(args, machine, pinning, runs, floors)
                write_outputs(args.out, document, with_plot=False)
                if not record["ok"]:
                    return False
    return True


def main(argv: list[str] | None = None) -> int:
    args, pinning = parse_arguments(argv)
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    machine = describe_machine()
    print(f"machine: {describe_machine_line(machine)}")
    if pinning.note:
        print(f"pinning: {pinning.note}")

    runs: list[dict[str, Any]] = []
    floors: list[dict[str, Any]] = []
    try:
        failed = not run_rounds(args, pinning, machine, runs, floors)
    finally:
        machine["load_average_end"] = list(os.getloadavg())
        document = build_document(args, machine, pinning, runs, floors)
        write_outputs(args.out, document, with_plot=True)

    print_findings(document)
    print(f"\nwrote {args.out / 'scaling.json'}, scaling.md and scaling.png")
    if failed:
        print("scaling: a run failed; results so far are written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
