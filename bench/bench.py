"""Benchmarks: how fast the daemon relays and fans out, and what it costs.

    make bench                                   # every scenario, ~3 minutes
    make bench BENCH_ARGS="--only fanout --scale 0.25"

Three processes (plus the load client's workers), all on 127.0.0.1: the
daemon (`comfy-progress serve`), a fake ComfyUI (bench/fake_comfy.py) that
holds prompts queued until told to play them and reports when it wrote each
progress frame, and the load client (bench/load.py: worker processes on raw
non-blocking sockets). Per scenario it prints one row and writes them all as
JSON (artifacts/bench.json):

- floor            a plain os.write loop to 1,000 loopback sockets: the machine's
                   floor for CPU per subscriber-event, right now; and to 1,000 Unix
                   sockets, the floor of fanout_unix
- latency          20 tasks x 5 subscribers, 400 frames/s in all, evenly spread
- latency_aligned  the same, but the 20 tasks step in the same instant (bursts of 20)
- fanout           4 tasks one after another, 1,000 subscribers each, 50 steps at 50/s
- fanout_unix      the fanout shape with the subscribers on the daemon's Unix socket,
                   as a reverse proxy on the same host reaches it (socket activation
                   hands the daemon both listeners, as systemd does)
- fanout_nginx     the fanout shape through nginx as shipped (the site file), nginx
                   reaching the daemon over loopback TCP, then over its Unix socket:
                   the CPU of daemon and nginx together per event
- fanout_parallel  the same 4 tasks at once
- burst            1 task, 100 subscribers, 5,000 frames within 30 ms
- idle             5,000 open streams: the daemon's RSS growth per stream
- soak_10k         10,000 streams on one task, 20 steps/s for 60 s (counts only)
- generate         POST /generate, 2,000 requests, 50 in flight, keep-alive, held queued;
                   each on a fresh daemon: as shipped (the daemon's queue holds the
                   prompts; ComfyUI gets two at a time), and with every prompt handed
                   to the fake ComfyUI, which holds them all queued; each shape three
                   times (--generate-runs), its row the run with the median req/s
- new requests     GET /healthz on a new connection every 20 ms while the streams of
                   fanout_parallel and idle are open

Latency is "frame written by ComfyUI -> subscriber holds it"; freshness is,
per subscriber, "ComfyUI's last progress frame -> the subscriber holds that
state (or a newer one)". The daemon's CPU (/proc/<pid>/stat) is counted from
the first progress frame to the last terminal event, every connection open,
and divided by the subscriber-events delivered. A figure taken while a load
worker used more than 80 % of a core is marked `client-saturated`, and the
scenario is run again with half the subscribers; so is one taken while every
core of the machine was more than 90 % busy (`machine-saturated`: then the
load client reads late, and latency is the machine's rather than the daemon's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench import load
from bench.figures import format_row, ms_summary, percentile, summarise_profile
from bench.nginx_front import NginxCpu, nginx_front
from bench.processes import (
    DAEMON_SETTINGS,
    EVERY_PROMPT_TO_COMFY,
    Address,
    CpuSampler,
    Daemon,
    daemon_process,
    fake_comfy,
    machine_busy,
    machine_ticks,
    request,
)

SITE_PREFIX = "/comfy"  # where systemd/nginx-comfy-progress.conf serves the API
WORKERS = 4  # load client processes holding the streams (--workers)
SATURATED = 0.8
# Every core busy (the daemon, the load, the fake and whatever else runs here):
# then the clients read late and latency is the machine's, not the daemon's.
MACHINE_SATURATED = 0.9


@dataclass
class Bench:
    daemon: Daemon
    comfy: Address
    sampler: CpuSampler
    profile_dir: Path | None = None
    next_task: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)
    workers: int = WORKERS

    @contextlib.contextmanager
    def profiling(self, name: str, daemon: Daemon | None = None) -> Iterator[None]:
        """py-spy on the daemon while the block runs (with --profile)."""
        if self.profile_dir is None:
            yield
            return
        pid = (daemon or self.daemon).pid
        path = self.profile_dir / f"{name.replace(' ', '_').replace(',', '')}.txt"
        spy = subprocess.Popen(
            [Path(sys.executable).parent / "py-spy", "record", "--pid", str(pid),
             "--format", "raw", "--rate", "250", "--nonblocking", "--output", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)
        try:
            yield
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait()
        print(f"  profile of {name} ({path}), self time:")
        for line in summarise_profile(path):
            print(f"    {line}")

    def create_tasks(self, count: int) -> list[tuple[str, int]]:
        tasks = []
        for _ in range(count):
            number = self.next_task
            self.next_task += 1
            status, body = request(
                self.daemon.address, "POST", "/generate", {"prompt": f"bench-{number}"}
            )
            assert status == 202, body
            tasks.append((json.loads(body)["taskId"], number))
        return tasks

    def start_workers(
        self, target: Any, args_per_worker: list[tuple[Any, ...]]
    ) -> list[tuple[Any, Connection]]:
        context = multiprocessing.get_context("fork")
        workers = []
        for args in args_per_worker:
            parent, child = context.Pipe()
            process = context.Process(target=target, args=(child, *args), daemon=True)
            process.start()
            workers.append((process, parent))
        for _, pipe in workers:
            if not pipe.poll(300):
                raise RuntimeError("a load worker did not get ready")
            pipe.recv()
        return workers

    @contextlib.contextmanager
    def probing(self, interval: float = 0.02) -> Iterator[list[float | None]]:
        """New-connection GET /healthz every `interval` s while the block runs."""
        samples: list[float | None] = []
        [(process, pipe)] = self.start_workers(load.probe_worker, [(self.daemon.address, interval)])
        try:
            yield samples
        finally:
            pipe.send(("stop",))
            samples.extend(pipe.recv()[1])
            process.join()

    def open_streams(
        self,
        tasks: list[tuple[str, int]],
        per_task: int,
        keep_from: int = 0,
        address: Address | str | None = None,
        prefix: str = "",
    ) -> list[tuple[Any, Connection]]:
        subscriptions = [task for task in tasks for _ in range(per_task)]
        shares = [subscriptions[i :: self.workers] for i in range(self.workers)]
        return self.start_workers(
            load.subscriber_worker,
            [
                (address or self.daemon.address, share, keep_from, prefix)
                for share in shares
                if share
            ],
        )

    def streams(
        self,
        name: str,
        tasks: int,
        per_task: int,
        spec: dict[str, Any],
        *,
        probe: bool = False,
        light: bool = False,
        address: Address | str | None = None,
        nginx: NginxCpu | None = None,
    ) -> dict[str, Any]:
        """Open `per_task` streams on each of `tasks` new tasks, play them, measure.

        With `light`, only the counts and the last progress state are recorded
        per subscriber (latency then covers the last frame only). The streams go to
        `address` (a Unix socket's path, or nginx's port) if given, else to the daemon's
        TCP port; `nginx` (in front) has its CPU counted as the daemon's is."""
        steps = spec["steps"]
        created = self.create_tasks(tasks)
        time.sleep(0.5)  # let the daemon settle after the new tasks
        rss_before = self.daemon.rss_kib()
        workers = self.open_streams(
            created,
            per_task,
            keep_from=steps if light else 0,
            address=address,
            prefix="" if nginx is None else SITE_PREFIX,
        )
        rss_open = self.daemon.rss_kib()
        nginx_sampler = CpuSampler(nginx) if nginx is not None else None
        with contextlib.ExitStack() as stack:
            if nginx_sampler is not None:
                nginx_sampler.start()
                stack.callback(nginx_sampler.stop.set)
            stack.enter_context(self.profiling(name))
            probes = stack.enter_context(self.probing()) if probe else None
            machine0 = machine_ticks()
            for _, pipe in workers:
                pipe.send(("go",))
            status, body = request(
                self.comfy, "POST", "/bench/run", {**spec, "tasks": [n for _, n in created]}
            )
            assert status == 200, body
            stamps = {int(k): v for k, v in json.loads(body).items()}
            outcomes = []
            for process, pipe in workers:
                if not pipe.poll(120):
                    pipe.send(("stop",))
                outcomes.append(pipe.recv())
                process.join()
            machine = machine_busy(machine0)
        by_step: dict[tuple[int, int], list[float]] = {}  # (task, step) -> latencies
        freshness: list[float] = []
        seen: list[float] = []
        delivered = 0
        complete = 0
        last_terminal = 0.0
        for _, _, _, results in outcomes:
            for task, events, terminal, terminal_at, count in results:
                sent = stamps[task]
                delivered += count
                complete += terminal == "complete"
                if terminal_at is not None:
                    last_terminal = max(last_terminal, terminal_at)
                values = set()
                fresh = None
                progress = events[:-1] if terminal is not None else events
                for value, arrival in progress:
                    if 1 <= value <= steps and value not in values:
                        values.add(value)
                        by_step.setdefault((task, value), []).append(arrival - sent[value - 1])
                    if value >= steps and fresh is None:
                        fresh = arrival - sent[-1]
                if fresh is None and terminal_at is not None:
                    fresh = terminal_at - sent[-1]  # the last step was skipped for the end
                if fresh is not None:
                    freshness.append(fresh)
                progress_events = count - (terminal is not None)
                seen.append((progress_events if light else len(values)) / steps)
        latencies = [latency for samples in by_step.values() for latency in samples]
        subscribers = tasks * per_task
        first_frame = min(v[0] for v in stamps.values())
        window = max(last_terminal - first_frame, 1e-9)
        cpu = self.sampler.at(last_terminal) - self.sampler.at(first_frame)
        client_load = max(o[1] / o[2] if o[2] else 0.0 for o in outcomes)
        row: dict[str, Any] = {
            "scenario": name,
            "shape": f"{tasks} tasks x {per_task} subscribers, {steps} steps",
            "subscribers": subscribers,
            "delivered": delivered,
            "expected": subscribers * (steps + 1),
            "completed": complete,
            "latency": ms_summary(latencies),
            "freshness": ms_summary(freshness),
            "min_seen_share": round(min(seen, default=0.0), 3),
            "below_90pct": sum(1 for s in seen if s < 0.9),
            "events_per_s": round(delivered / window),
            "kib_per_open_stream": round((rss_open - rss_before) / subscribers, 2),
            "daemon_cpu_s": round(cpu, 3),
            "cpu_us_per_event": round(cpu / max(delivered, 1) * 1e6, 2),
            "client_cpu": round(client_load, 2),
            "client_saturated": client_load > SATURATED,
            "machine_busy": round(machine, 2),
            "machine_saturated": machine > MACHINE_SATURATED,
        }
        if by_step:
            row["slowest_step"] = slowest_step(by_step, [n for _, n in created])
        if nginx_sampler is not None:
            nginx_cpu = nginx_sampler.at(last_terminal) - nginx_sampler.at(first_frame)
            row["nginx_cpu_s"] = round(nginx_cpu, 3)
            row["nginx_cpu_us_per_event"] = round(nginx_cpu / max(delivered, 1) * 1e6, 2)
            row["relay_cpu_us_per_event"] = round((cpu + nginx_cpu) / max(delivered, 1) * 1e6, 2)
        if probes is not None:
            row["new_requests"] = self.probe_summary(probes)
        self.report(row)
        return row

    def probe_summary(self, samples: list[float | None]) -> dict[str, Any]:
        answered = [s for s in samples if s is not None]
        return {
            "count": len(samples),
            "failed": len(samples) - len(answered),
            **ms_summary(answered),
        }

    def report(self, row: dict[str, Any]) -> None:
        self.results.append(row)
        print(format_row(row), flush=True)

    def idle(self, streams: int, tasks: int = 5) -> None:
        created = self.create_tasks(tasks)
        time.sleep(1.0)  # let the daemon settle after the new tasks
        before = self.daemon.rss_kib()
        workers = self.open_streams(created, streams // tasks)
        time.sleep(1.0)
        after = self.daemon.rss_kib()
        with self.probing() as probes:
            time.sleep(5.0)
        row = {
            "scenario": "idle",
            "shape": f"{streams} open streams on {tasks} queued tasks",
            "rss_before_kib": before,
            "rss_after_kib": after,
            "kib_per_stream": round((after - before) / streams, 2),
        }
        row["new_requests"] = self.probe_summary(probes)
        self.report(row)
        for _, pipe in workers:
            pipe.send(("stop",))
        request(
            self.comfy,
            "POST",
            "/bench/run",
            {"tasks": [n for _, n in created], "steps": 1, "burst": 0.001},
        )
        for process, pipe in workers:
            pipe.recv()
            process.join()

    def floor(self, streams: int = 1000, rounds: int = 50) -> None:
        """What a plain loop pays per os.write of a 250-byte chunk to a loopback
        socket with TCP_NODELAY right now: the machine's floor for CPU per
        subscriber-event. Taken to a reader that reads (as subscribers do), to one
        that never reads (so is never woken), and over Unix sockets."""
        chunk = b"%x\r\n%b\r\n" % (250, b"x" * 250)
        row = {
            "scenario": "floor",
            "shape": f"plain os.write loop, {streams} loopback sockets x {rounds}",
            "cpu_us_per_write": self._floor_once(chunk, streams, rounds, reads=True),
            "cpu_us_per_write_unread": self._floor_once(chunk, streams, rounds, reads=False),
            "cpu_us_per_write_unix": self._floor_once(
                chunk, streams, rounds, reads=True, unix=True
            ),
        }
        self.report(row)

    def _floor_once(
        self, chunk: bytes, streams: int, rounds: int, *, reads: bool, unix: bool = False
    ) -> float:
        with contextlib.ExitStack() as stack:
            address: str | tuple[str, int]
            if unix:
                listener = stack.enter_context(socket.socket(socket.AF_UNIX))
                address = str(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "s")
            else:
                listener = stack.enter_context(socket.socket())
                address = ("127.0.0.1", 0)
            listener.bind(address)
            listener.listen(streams)
            context = multiprocessing.get_context("fork")
            parent, child = context.Pipe()
            expected = streams * rounds * len(chunk) if reads else 0
            process = context.Process(
                target=load.floor_reader,
                args=(child, listener.getsockname(), streams, expected),
                daemon=True,
            )
            process.start()
            accepted = [listener.accept()[0] for _ in range(streams)]
            for sock in accepted:
                stack.enter_context(sock)
                if not unix:
                    # As the daemon's sockets (Trio sets it): without it, Nagle holds
                    # a write back while the last one is unacknowledged, a cheaper
                    # write than the daemon ever makes.
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            parent.recv()
            fds = [sock.fileno() for sock in accepted]
            cpu = 0.0
            for _ in range(rounds):
                start = time.process_time()
                for fd in fds:
                    os.write(fd, chunk)
                cpu += time.process_time() - start
                time.sleep(0.02)
            if not reads:
                parent.send(("stop",))
            parent.recv()
            process.join()
        return round(cpu / (streams * rounds) * 1e6, 2)

    def generate(
        self, daemon: Daemon, name: str, shape: str, requests: int, in_flight: int, workers: int = 2
    ) -> dict[str, Any]:
        """POST /generate to a fresh `daemon`; the fake ComfyUI holds every prompt queued.
        Returns the row (the caller reports the median of several runs)."""
        share = requests // workers
        first = self.next_task
        self.next_task += requests
        pool = self.start_workers(
            load.generate_worker,
            [
                (daemon.address, in_flight // workers, share, first + i * share)
                for i in range(workers)
            ],
        )
        with self.profiling(name, daemon):
            cpu0 = daemon.cpu_seconds()
            for _, pipe in pool:
                pipe.send(("go",))
            outcomes = []
            for process, pipe in pool:
                outcomes.append(pipe.recv())
                process.join()
        cpu = daemon.cpu_seconds() - cpu0
        latencies = [x for o in outcomes for x in o[3]]
        wall = max(o[2] for o in outcomes)
        client_load = max(o[1] / o[2] for o in outcomes)
        row = {
            "scenario": name,
            "shape": f"POST /generate x {requests}, {in_flight} in flight, keep-alive, {shape}",
            "answered_202": len(latencies),
            "failed": sum(o[4] for o in outcomes),
            "req_per_s": round(len(latencies) / wall),
            "latency": ms_summary(latencies),
            "daemon_cpu_s": round(cpu, 3),
            "cpu_us_per_request": round(cpu / max(len(latencies), 1) * 1e6),
            "client_cpu": round(client_load, 2),
            "client_saturated": client_load > SATURATED,
        }
        return row


SCENARIOS = (
    "floor", "latency", "latency_aligned", "fanout", "fanout_unix", "fanout_nginx",
    "fanout_parallel", "burst", "idle",
    "soak_10k", "generate",
)  # fmt: skip


# POST /generate on a fresh daemon each: (row name, what holds the prompts, settings).
GENERATE_RUNS = (
    # The daemon as shipped: its own queue holds what ComfyUI has no room for
    # (backend_max_pending=2: ComfyUI holds two, the daemon the rest).
    ("generate", "held queued by the daemon (default)", DAEMON_SETTINGS),
    # Every prompt POSTed to the fake ComfyUI, which holds them all queued.
    (
        "generate (every prompt to ComfyUI)",
        "held queued by ComfyUI",
        DAEMON_SETTINGS + EVERY_PROMPT_TO_COMFY,
    ),
)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    scale = args.scale
    only = set(args.only or SCENARIOS)

    def n(value: int) -> int:
        return max(1, int(value * scale))

    profile_dir = Path(args.profile) if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="comfy-progress-bench-") as tmp,
        fake_comfy() as comfy,
    ):
        results: list[dict[str, Any]] = []
        next_task = 0
        if only - {"generate"}:
            with daemon_process(
                Path(tmp) / "streams",
                comfy,
                DAEMON_SETTINGS + EVERY_PROMPT_TO_COMFY,
                unix_socket=bool(only & {"fanout_unix", "fanout_nginx"}),
            ) as daemon:
                sampler = CpuSampler(daemon)
                sampler.start()
                bench = Bench(daemon, comfy, sampler, profile_dir, workers=args.workers)
                run_streams(bench, args, only, n)
                sampler.stop.set()
                results += bench.results
                next_task = bench.next_task
        if "generate" in only:
            for name, holder, settings in GENERATE_RUNS:
                runs = []
                for run_number in range(args.generate_runs):
                    with daemon_process(
                        Path(tmp) / f"generate-{next_task}", comfy, settings
                    ) as daemon:
                        # py-spy on the first run only: its overhead would move the median.
                        profile = profile_dir if run_number == 0 else None
                        bench = Bench(daemon, comfy, CpuSampler(daemon), profile, next_task)
                        runs.append(bench.generate(daemon, name, holder, n(2000), 50))
                        next_task = bench.next_task
                row = median_run(runs)
                print(format_row(row), flush=True)
                results.append(row)
        return results


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median req/s, with every run's figures beside it: one run
    on a shared VM can be 15 % off the next."""
    ordered = sorted(runs, key=lambda row: row["req_per_s"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["failed"] = sum(run["failed"] for run in runs)  # a failure in any run shows
    row["runs"] = [
        {key: run[key] for key in ("req_per_s", "cpu_us_per_request", "failed")}
        | {"p99_ms": run["latency"]["p99_ms"]}
        for run in runs
    ]
    return row


def slowest_step(by_step: dict[tuple[int, int], list[float]], order: list[int]) -> dict[str, Any]:
    """The step whose median latency over its subscribers is the highest: where a
    tail comes from (a task's first steps, or one moment that held everybody up)."""
    (task, step), samples = max(by_step.items(), key=lambda item: percentile(item[1], 0.5))
    return {
        "task": order.index(task) + 1,
        "step": step,
        "p50_ms": round(percentile(samples, 0.5) * 1000, 2),
    }


def run_streams(
    bench: Bench, args: argparse.Namespace, only: set[str], n: Callable[[int], int]
) -> None:
    """Every scenario but generate, on one daemon that hands ComfyUI every prompt."""
    tasks, steps = args.fanout_tasks, args.fanout_steps
    stream_scenarios: dict[str, tuple[int, int, dict[str, Any], bool]] = {
        "latency": (20, 5, {"steps": 50, "rate": 20, "parallel": True, "stagger": True}, False),
        "latency_aligned": (20, 5, {"steps": 50, "rate": 20, "parallel": True}, False),
        "fanout": (tasks, n(1000), {"steps": steps, "rate": 50}, False),
        "fanout_unix": (tasks, n(1000), {"steps": steps, "rate": 50}, False),
        "fanout_parallel": (tasks, n(1000), {"steps": steps, "rate": 50, "parallel": True}, True),
        "burst": (1, 100, {"steps": 5000, "burst": 0.03}, False),
    }
    if "floor" in only:
        bench.floor()
    if "idle" in only:
        bench.idle(n(5000))  # first: RSS growth means most on a fresh daemon
    for name, (tasks, per_task, spec, probe) in stream_scenarios.items():
        if name not in only:
            continue
        address = bench.daemon.unix_path if name == "fanout_unix" else None
        row = bench.streams(name, tasks, per_task, spec, probe=probe, address=address)
        saturated = row["client_saturated"] or row["machine_saturated"]
        if saturated and not args.no_halve and per_task >= 10:
            halved = f"{name} (halved)"
            bench.streams(halved, tasks, per_task // 2, spec, probe=probe, address=address)
    if "fanout_nginx" in only:
        fanout_behind_nginx(bench, n(1000))
    if "soak_10k" in only:
        # 10,000 streams on one task at 20 steps/s for 60 s: everyone must end
        # with `complete`; counts only (a full record would not fit the client).
        spec = {"steps": 1200, "rate": 20}
        bench.streams("soak_10k", 1, n(10_000), spec, probe=True, light=True)


def fanout_behind_nginx(bench: Bench, per_task: int) -> None:
    """The fanout shape through nginx as shipped, reaching the daemon over loopback TCP
    and then over its Unix socket: the whole relay's CPU per event, both ways."""
    spec = {"steps": 50, "rate": 50}
    assert bench.daemon.unix_path is not None
    upstreams: dict[str, int | Path] = {
        "TCP": bench.daemon.address[1],
        "Unix socket": Path(bench.daemon.unix_path),
    }
    with tempfile.TemporaryDirectory(prefix="comfy-progress-bench-nginx-") as tmp:
        for label, upstream in upstreams.items():
            workdir = Path(tmp) / label.replace(" ", "-")
            with nginx_front(workdir, upstream) as (address, nginx):
                bench.streams(
                    f"fanout_nginx ({label})", 4, per_task, spec, address=address, nginx=nginx
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=SCENARIOS, help="run only these")
    parser.add_argument("--scale", type=float, default=1.0, help="subscribers/requests x this")
    parser.add_argument(
        "--workers",
        type=int,
        default=WORKERS,
        help="load client processes holding the streams (on loopback each one a write"
        " wakes costs the daemon a wake-up)",
    )
    parser.add_argument("--no-halve", action="store_true", help="skip the halved reruns")
    parser.add_argument(
        "--fanout-tasks", type=int, default=4, help="tasks of the fanout shapes (default 4)"
    )
    parser.add_argument(
        "--fanout-steps",
        type=int,
        default=50,
        help="steps per task of the fanout shapes (default 50; few steps and many tasks"
        " show what ending a stream costs)",
    )
    parser.add_argument(
        "--generate-runs",
        type=int,
        default=3,
        help="runs of each generate shape, each on a fresh daemon; the row is the run with"
        " the median req/s (default 3)",
    )
    parser.add_argument("--profile", metavar="DIR", help="py-spy the daemon per scenario into DIR")
    parser.add_argument("--json", default="artifacts/bench.json", help="where the rows go")
    args = parser.parse_args()
    if args.generate_runs < 1:
        parser.error("--generate-runs must be 1 or more")
    if set(args.only or SCENARIOS) & {"fanout", "fanout_parallel", "fanout_nginx"}:
        # Every subscriber of a TCP fanout shape holds a loopback connection of
        # its own, all open at once: beyond the ephemeral ports, connects fail.
        needed = args.fanout_tasks * max(1, int(1000 * args.scale))
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        if needed > (high - low + 1) * 0.9:
            parser.error(
                f"the fanout shapes would open {needed} loopback connections at once, more"
                f" than this machine's {high - low + 1} ephemeral ports"
                " (net.ipv4.ip_local_port_range) allow: fewer --fanout-tasks, or --only"
                " fanout_unix"
            )
    results = run(args)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
