"""Structured logs: every line logfmt, ids where they apply, no secrets, level configurable."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import trio

from daemon.http.client import http_request
from daemon.ops.logs import LogfmtFormatter, setup_logging
from daemon.simulator import ComfySimulator
from tests.daemon.harness import FAST, read_events, running_daemon
from tests.daemon.process import daemon_process

# key=bare or key="quoted with \" escapes", separated by single spaces, nothing else.
_PAIR = re.compile(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|[^\s"=]+)')
_ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
LEVELS = {"debug", "info", "warning", "error", "critical"}
IDS = ("task_id", "prompt_id", "backend")


def parse_logfmt(line: str) -> dict[str, str]:
    """One logfmt line -> fields; fails on anything that is not strictly key=value pairs."""
    fields: dict[str, str] = {}
    position = 0
    while position < len(line):
        found = _PAIR.match(line, position)
        assert found is not None, f"not logfmt at {position}: {line!r}"
        key, raw = found.groups()
        assert key not in fields, f"{key} twice: {line!r}"
        # Quoted values use JSON's escapes (\\ \" \n \r \t \uXXXX).
        fields[key] = json.loads(raw) if raw.startswith('"') else raw
        position = found.end()
        if position < len(line):
            assert line[position] == " ", line
            position += 1
    for required in ("level", "logger", "msg"):
        assert required in fields, f"no {required}: {line!r}"
    assert fields["level"] in LEVELS, line
    return fields


def test_the_formatter_keeps_one_record_on_one_line() -> None:
    formatter = LogfmtFormatter(with_time=True)
    record = logging.LogRecord(
        "daemon.tasks.actor",
        logging.WARNING,
        __file__,
        1,
        'odd "text"\r\nwith\ttabs \x1b[31m%s',
        ("é",),
        None,
    )
    record.task_id = "t-1"
    record.prompt_id = "cp-2"
    record.backend = "http://127.0.0.1:8188"
    record.authorization = "Bearer secret"  # not a context field: never printed
    try:
        raise ValueError("boom\nline two")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = formatter.format(record)
    assert "\n" not in line
    assert "\r" not in line
    assert "\x1b" not in line
    fields = parse_logfmt(line)
    assert _ISO_UTC.fullmatch(fields["time"])
    assert fields["msg"] == 'odd "text"\r\nwith\ttabs \x1b[31mé'
    assert fields["task_id"] == "t-1"
    assert fields["backend"] == "http://127.0.0.1:8188"
    assert "ValueError: boom\nline two" in fields["error"]
    assert "secret" not in line


_GATHERING = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")


def test_the_level_is_configurable() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_gathering = {name: getattr(logging, name) for name in _GATHERING}
    try:
        for level, shown in (("warning", False), ("debug", True)):
            stream = io.StringIO()
            setup_logging(level, stream=stream)
            logging.getLogger("daemon.test").info("an info line")
            logging.getLogger("daemon.test").warning("a warning line")
            lines = stream.getvalue().splitlines()
            assert any("a warning line" in line for line in lines)
            assert any("an info line" in line for line in lines) is shown
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, value in saved_gathering.items():
            setattr(logging, name, value)


def test_time_is_left_out_only_on_the_journald_stream_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process started from a service (or from a shell in a terminal that
    # systemd --user runs) inherits JOURNAL_STREAM while its stderr goes
    # elsewhere (`2>file`): those lines need their time. systemd.exec(5): compare
    # the variable's DEVICE:INODE with the stream's own.
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_gathering = {name: getattr(logging, name) for name in _GATHERING}
    journal, elsewhere = tmp_path / "journal-stream", tmp_path / "daemon.log"
    journal.touch()
    found = journal.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{found.st_dev}:{found.st_ino}")
    try:
        for path, timed in ((elsewhere, True), (journal, False)):
            with path.open("a") as stream:
                setup_logging("info", stream=stream)
                logging.getLogger("daemon.test").info("a line")
                stream.flush()
            (line,) = path.read_text().splitlines()
            assert ("time" in parse_logfmt(line)) is timed, (path.name, line)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, value in saved_gathering.items():
            setattr(logging, name, value)


def test_records_skip_gathering_what_the_line_never_shows() -> None:
    # Where a record was made (a stack walk) and by which thread and process: the
    # logfmt line shows none of it, so it is not gathered; the line is unchanged.
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_gathering = {name: getattr(logging, name) for name in _GATHERING}
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    try:
        stream = io.StringIO()
        setup_logging("info", stream=stream)
        root.addHandler(Keep())
        logging.getLogger("daemon.test").info("task created", extra={"task_id": "t-1"})
        (record,) = records
        assert (record.funcName, record.lineno) == ("(unknown function)", 0)
        assert (record.thread, record.process) == (None, None)
        line = stream.getvalue().rstrip("\n")
        assert line.endswith('level=info logger=daemon.test task_id=t-1 msg="task created"')
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, value in saved_gathering.items():
            setattr(logging, name, value)


PROMPT = "PROMPT-SECRET a red fox"
SECRETS = ("PROMPT-SECRET", "TOKEN-SECRET", "COOKIE-SECRET")


async def test_a_daemon_process_logs_each_event_with_its_ids(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        simulator = ComfySimulator(FAST)
        port = await nursery.start(simulator.run, ("127.0.0.1", 0))
        backend = f"http://127.0.0.1:{port}"
        async with daemon_process(tmp_path / "data", backend, "log_level=debug") as daemon:
            headers = [
                ("Content-Type", "application/json"),
                ("Authorization", "Bearer TOKEN-SECRET"),
                ("Cookie", "session=COOKIE-SECRET"),
            ]
            tasks = []
            for fail in (None, "KSampler"):
                simulator.set_fail_at(fail)
                body = json.dumps({"prompt": PROMPT}).encode()
                answer = await http_request(
                    "POST", daemon.url + "/generate", headers=headers, body=body
                )
                assert answer.status == 202
                task_id = answer.json()["taskId"]
                events = await read_events(daemon.url, task_id)
                assert events[-1].event == ("complete" if fail is None else "error-event")
                tasks.append(task_id)
            daemon.terminate()
            assert await daemon.wait() == 0
            await daemon.exited.wait()
            output = daemon.output.decode()
        nursery.cancel_scope.cancel()

    lines = [parse_logfmt(line) for line in output.splitlines()]
    # A pipe, not journald's stream, even when the test run inherited JOURNAL_STREAM.
    assert all(_ISO_UTC.fullmatch(line.get("time", "")) for line in lines)
    for secret in SECRETS:
        assert secret not in output

    def one(pattern: str, **match: str) -> dict[str, str]:
        found = [
            line
            for line in lines
            if re.match(pattern, line["msg"]) and all(line.get(k) == v for k, v in match.items())
        ]
        assert len(found) == 1, (pattern, match, output)
        return found[0]

    done, failed = tasks
    for task_id in tasks:
        created = one("task created$", task_id=task_id)
        prompt_id = created["prompt_id"]
        assert "backend" not in created  # chosen later, at dispatch
        ids = {"task_id": task_id, "prompt_id": prompt_id, "backend": backend}
        one("submitted to ", **ids)
    one("task completed: ", task_id=done, backend=backend)
    one("task ended in error comfy_error: ", task_id=failed, backend=backend)
    one("ComfyUI WebSocket open: ", backend=backend)
    one("received SIGTERM$", logger="daemon.app")
    one("shutting down", logger="daemon.app")
    # Every line of the task code names its task, every line of the backend its ComfyUI.
    for line in lines:
        if line["logger"] == "daemon.tasks.actor":
            assert all(key in line for key in IDS), line
        if line["logger"] == "daemon.comfy.backend":
            assert line.get("backend") == backend, line


async def test_backend_drops_and_reconnects_are_logged_with_the_backend(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_daemon(tmp_path) as daemon:
        backend = daemon.app.backend
        while not backend.is_connected():
            await backend.connected_changed.wait()
        seen = backend.reconnected.count
        assert daemon.simulator is not None
        daemon.simulator.drop_websockets()
        while backend.reconnected.count == seen:
            await backend.reconnected.wait()
    formatter = LogfmtFormatter(with_time=False)
    ours = [
        parse_logfmt(formatter.format(record))
        for record in caplog.records
        if record.name == "daemon.comfy.backend"
    ]
    messages = [line["msg"] for line in ours]
    assert sum(m.startswith("ComfyUI WebSocket open") for m in messages) == 2, messages
    assert any(re.match(r"ComfyUI WebSocket to \S+ (closed|failed)", m) for m in messages)
    assert all(line.get("backend") == backend.name for line in ours), ours
