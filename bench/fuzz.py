"""HTTP fuzz run: 100,000 hostile requests against the daemon; every one must hold.

    make fuzz        (or: python -m bench.fuzz --requests 100000 --seed 1)

The grammar is the test suite's (tests/fuzz/grammar.py), driven by a seeded
`random.Random` per worker instead of Hypothesis, so a run is repeatable and
fast: `--connections` threads each send one request per connection to the
daemon (a real process, `--simulate`, short timeouts). The invariants are the
test's: no crash, no error or traceback in the daemon's log, no 500 or other
undocumented status, every connection answered or closed within the
configured timeouts. Prints the figures; the exit status says whether it held.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.fuzz.grammar import Context, RandomSource, request
from tests.fuzz.harness import ANSWER_BOUND, FuzzDaemon, exchange, fuzz_daemon, problems

SHOWN_FAILURES = 20


@dataclass
class Tally:
    requests: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    unanswered: int = 0  # closed by the server while we sent (early 413/431) or reset
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def worker(
    daemon: FuzzDaemon, context: Context, seed: int, count: int, tally: Tally, stop: threading.Event
) -> None:
    source = RandomSource(random.Random(seed))
    for _ in range(count):
        if stop.is_set():
            return
        fuzz = request(source, context)
        try:
            result = exchange(daemon.address, fuzz)
            found = problems(fuzz, result)
        except OSError as exc:  # cannot even connect: the daemon is gone or refusing
            result = None
            found = [f"connection failed: {exc!r}"]
        with tally.lock:
            tally.requests += 1
            if result is not None:
                tally.statuses.update(result.statuses)
                tally.unanswered += not result.statuses
            tally.failures.extend(f"{problem}: {fuzz!r}" for problem in found)


def run(total: int, connections: int, seed: int) -> int:
    tally = Tally()
    stop = threading.Event()
    with tempfile.TemporaryDirectory() as tmp, fuzz_daemon(Path(tmp) / "data") as daemon:
        started = time.monotonic()
        log_problems: list[str] = []
        share, extra = divmod(total, connections)
        with ThreadPoolExecutor(connections) as pool:
            futures = [
                pool.submit(
                    worker,
                    daemon,
                    daemon.context,
                    seed * 1000 + index,
                    share + (index < extra),
                    tally,
                    stop,
                )
                for index in range(connections)
            ]
            while not all(f.done() for f in futures):
                time.sleep(1.0)
                log_problems += daemon.log.new_problems()
                if daemon.process.poll() is not None:
                    stop.set()  # crashed: nothing more to learn
                print(f"\r{tally.requests} requests", end="", file=sys.stderr, flush=True)
            for future in futures:
                future.result()
        elapsed = time.monotonic() - started
        time.sleep(0.5)
        log_problems += daemon.log.new_problems()
        crashed = daemon.process.poll() is not None
    print(file=sys.stderr)
    print(f"requests: {tally.requests} in {elapsed:.1f} s ({tally.requests / elapsed:.0f}/s)")
    print(f"connections in parallel: {connections}, seed: {seed}, bound: {ANSWER_BOUND:.1f} s")
    histogram = ", ".join(f"{s}: {n}" for s, n in sorted(tally.statuses.items()))
    print(f"statuses: {histogram}")
    print(f"no status (server closed or reset while we sent): {tally.unanswered}")
    print(f"failures: {len(tally.failures)}, daemon log errors: {len(log_problems)}")
    print(f"daemon crashed: {'yes' if crashed else 'no'}")
    for line in tally.failures[:SHOWN_FAILURES] + log_problems[:SHOWN_FAILURES]:
        print("  " + line[:2000])
    return 1 if tally.failures or log_problems or crashed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    return run(args.requests, args.connections, args.seed)


if __name__ == "__main__":
    sys.exit(main())
