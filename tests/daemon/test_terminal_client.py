"""`comfy-progress generate` as a real process against the daemon and the simulator."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import signal
import struct
import subprocess
import termios
from functools import partial
from pathlib import Path

import pytest
import trio

from daemon.terminal.client import ClientFailure, GenerateClient, Options
from daemon.terminal.display import Display
from tests.daemon.cli_process import (
    CLI,
    CuttingProxy,
    Output,
    check_png,
    run_generate,
)
from tests.daemon.harness import Daemon, running_daemon
from tests.daemon.process import daemon_process


def only_task(daemon: Daemon) -> str:
    actors = daemon.app.registry.actors()
    assert len(actors) == 1, actors
    return actors[0].task_id


async def test_success_saves_a_png_and_prints_its_url(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        target = tmp_path / "fox.png"
        done = await run_generate(
            "a red fox", "--server", daemon.url, "--output", str(target), "--seed", "42"
        )
        stderr = done.stderr.decode()
        assert done.returncode == 0, stderr
        urls = done.stdout.decode().splitlines()
        assert len(urls) == 1
        assert urls[0].startswith(f"{daemon.url}/image/")
        served = await daemon.request("GET", urls[0].removeprefix(daemon.url))
        assert served.status == 200
        saved = target.read_bytes()
        assert saved == served.body
        assert check_png(saved) == (512, 512)
        # The image through its temporary name only: nothing else is left behind.
        left = list(await trio.Path(tmp_path).iterdir())
        assert sorted(p.name for p in left) == ["data", "fox.png"]

        actor = daemon.app.registry.get(only_task(daemon))
        assert actor is not None
        assert actor.state.spec.seed == 42
        assert actor.state.spec.prompt == "a red fox"

    # stderr is not a terminal: plain lines, no redrawing, and not many of them.
    assert "\r" not in stderr
    assert "\x1b" not in stderr
    lines = stderr.splitlines()
    assert lines[0] == f"comfy-progress: task {actor.task_id}"
    assert any(re.fullmatch(r"\[0:\d\d\] Sampling image\.\.\. .*", line) for line in lines)
    assert "] Complete (100%)" in lines[-2]
    assert lines[-1] == f"comfy-progress: saved {target}"
    assert len(lines) <= 16, stderr


async def test_a_reader_of_the_url_that_left_is_no_failure(tmp_path: Path) -> None:
    """`comfy-progress generate ... -o fox.png | head -0`: nobody reads the URL any more
    (its pipe is closed), the image is still saved and the run still succeeds, with no
    traceback about the broken pipe."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader left before we print
    target = tmp_path / "fox.png"
    try:
        async with running_daemon(tmp_path) as daemon:
            done = await trio.run_process(
                [str(CLI), "generate", "a red fox", "--server", daemon.url, "-o", str(target)],
                stdin=b"",
                stdout=write_end,
                capture_stderr=True,
                check=False,
            )
    finally:
        os.close(write_end)
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert "BrokenPipeError" not in stderr, stderr
    assert check_png(target.read_bytes()) == (512, 512)


async def test_a_failed_generation_exits_1_with_the_servers_message(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        assert daemon.simulator is not None
        daemon.simulator.set_fail_at("KSampler")
        target = tmp_path / "never.png"
        done = await run_generate("a red fox", "--server", daemon.url, "--output", str(target))
        actor = daemon.app.registry.get(only_task(daemon))
        assert actor is not None
        error = actor.state.error
    assert error is not None
    assert error.code == "comfy_error"
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert done.stdout == b""
    assert f"comfy-progress: the generation failed: {error.message} [comfy_error]" in stderr
    assert error.details in stderr
    assert not target.exists()


async def test_a_refused_request_exits_1_with_the_servers_message(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        done = await run_generate("a red fox", "--server", daemon.url, "--seed", "-1")
        assert daemon.app.registry.created == 0
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert done.stdout == b""
    assert "comfy-progress: the server refused the request (400): seed: must be an integer" in (
        stderr
    )


async def test_the_api_token_comes_from_the_environment(tmp_path: Path) -> None:
    token = "terminal-token-0123456789"
    async with running_daemon(tmp_path, api_tokens=token) as daemon:
        refused = await run_generate("a red fox", "--server", daemon.url)
        assert daemon.app.registry.created == 0
        done = await run_generate(
            "a red fox", "--server", daemon.url, env={"COMFY_PROGRESS_API_TOKEN": token}
        )
    assert refused.returncode == 1
    assert b"needs an API token" in refused.stderr
    assert b"COMFY_PROGRESS_API_TOKEN" in refused.stderr
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().startswith(daemon.url + "/image/")


async def test_a_token_read_from_a_file_may_end_in_a_line_break(tmp_path: Path) -> None:
    # `export COMFY_PROGRESS_API_TOKEN=$(cat token.txt)` keeps the CR of a CRLF
    # file. The header cannot carry it: the client said "cannot reach the daemon"
    # (Illegal header value) and exited 1, the daemon never asked.
    token = "terminal-token-0123456789"
    async with running_daemon(tmp_path, api_tokens=token) as daemon:
        done = await run_generate(
            "a red fox", "--server", daemon.url, env={"COMFY_PROGRESS_API_TOKEN": token + "\r\n"}
        )
        assert daemon.app.registry.created == 1
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().startswith(daemon.url + "/image/")


async def test_the_clients_token_in_the_daemons_environment_is_not_a_setting(
    tmp_path: Path,
) -> None:
    # The client reads its token from COMFY_PROGRESS_API_TOKEN, a name under the
    # daemon's own prefix: started from a shell that exported it, the daemon
    # stopped with "unknown setting(s) in the environment (COMFY_PROGRESS_*):
    # api_token". It is not a setting; with no api_tokens the daemon says so.
    env = {"COMFY_PROGRESS_API_TOKEN": "terminal-token-0123456789"}
    async with daemon_process(
        tmp_path / "data", None, "simulator_step_time=0.01", env=env
    ) as daemon:
        done = await run_generate("a red fox", "--server", daemon.url, env=env)
    assert done.returncode == 0, done.stderr.decode()
    assert "COMFY_PROGRESS_API_TOKEN is the terminal client's token" in daemon.log()


async def test_no_daemon_and_bad_usage(tmp_path: Path) -> None:
    # A port nobody listens on (bound, then closed).
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    done = await run_generate("a red fox", "--server", f"http://127.0.0.1:{port}")
    assert done.returncode == 1
    assert b"comfy-progress: cannot reach the daemon" in done.stderr
    usage = await run_generate("a red fox", "--server", "https://example.invalid")
    assert usage.returncode == 2
    assert b"must be an http:// URL" in usage.stderr


async def test_ctrl_c_cancels_the_task_and_exits_130(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        sim = daemon.simulator
        assert sim is not None
        # A first task parks at its sampler, so the client's task waits queued
        # behind it: nothing can finish it before the Ctrl-C lands.
        sim.set_manual_steps(True)
        blocker = await daemon.generate()
        process = await trio.lowlevel.open_process(
            [str(CLI), "generate", "a red fox", "--server", daemon.url],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        stdout, stderr = Output(), Output()
        async with trio.open_nursery() as nursery:
            assert process.stdout is not None
            assert process.stderr is not None
            nursery.start_soon(stdout.read_all, process.stdout)
            nursery.start_soon(stderr.read_all, process.stderr)
            task_id = (await stderr.wait_for(rb"task (\S+)\n")).group(1).decode()
            await stderr.wait_for(rb"\] Queued")  # following the stream now
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 130, stderr.text()

        ended = await daemon.events(task_id)
        assert json.loads(ended[-1].data)["error"]["code"] == "cancelled"
        status = (await daemon.request("GET", f"/tasks/{task_id}")).json()
        assert status["status"] == "error"
        assert status["error"]["code"] == "cancelled"
        blocker_actor = daemon.app.registry.get(blocker)
        assert blocker_actor is not None
        assert not blocker_actor.is_done()  # only the client's own task was cancelled
    assert f"interrupted; cancelling task {task_id}" in stderr.text()
    assert stdout.data == b""


async def test_a_dropped_stream_resumes_with_last_event_id(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, sse_retry_ms=50) as daemon, trio.open_nursery() as nursery:
        proxy = CuttingProxy(daemon.bound.port)
        listeners = await nursery.start(partial(trio.serve_tcp, proxy.serve, 0, host="127.0.0.1"))
        server = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        done = await run_generate("a red fox", "--server", server)
        nursery.cancel_scope.cancel()
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert done.stdout.decode().startswith(f"{server}/image/")
    first, second = proxy.progress_heads()
    assert b"last-event-id" not in first.lower()
    resumed = re.search(rb"(?im)^last-event-id: (\d+)\r?$", second)
    assert resumed is not None, second
    assert int(resumed.group(1)) >= 0
    assert "reconnecting" in stderr


async def test_on_a_terminal_the_bar_is_redrawn_in_place(tmp_path: Path) -> None:
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    screen = Output()
    async with running_daemon(tmp_path) as daemon:
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
        try:
            process = await trio.lowlevel.open_process(
                [str(CLI), "generate", "a red fox", "--server", daemon.url],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=terminal,
                env=env,
            )
        finally:
            os.close(terminal)
        stdout = Output()
        async with trio.open_nursery() as nursery:
            assert process.stdout is not None
            nursery.start_soon(stdout.read_all, process.stdout)
            nursery.start_soon(_read_terminal, screen, controller)
            assert await process.wait() == 0, screen.text()
    text = screen.text()
    assert "\r" in text
    assert "\x1b[K" in text
    assert re.search(r"Sampling image\.\.\. +\[[█#]+[░-]*\] +\d+%", text), text
    assert re.search(r"Complete +\[[█#]{20}\] +100%", text), text
    # Every redrawn line fits the 100 columns, so it never wraps.
    assert all(len(line) < 100 for line in re.split(r"[\r\n]", text.replace("\x1b[K", "")))
    assert stdout.text().startswith(f"{daemon.url}/image/")


async def _read_terminal(screen: Output, controller: int) -> None:
    # Reads the pty until the child's side is closed (EIO, as Linux reports it).
    stream = trio.lowlevel.FdStream(controller)
    try:
        await screen.read_all(stream)
    except trio.BrokenResourceError:
        screen.closed = True


async def test_workflow_parameters_reach_the_task(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        done = await run_generate(
            "a red fox",
            "--server",
            daemon.url,
            "--workflow",
            "txt2img",
            "--param",
            "steps=5",
            "--param",
            "negativePrompt=blurry, dark",
        )
        assert done.returncode == 0, done.stderr.decode()
        actor = daemon.app.registry.get(only_task(daemon))
        assert actor is not None
        graph = json.dumps(actor.state.spec.graph)
        final = actor.last_message.payload["progress"]
    assert '"steps": 5' in graph
    assert "blurry, dark" in graph
    # The sampler ran 5 steps. (Which steps the terminal printed depends on how
    # ComfyUI's frames arrived: frames that arrive together are published as one.)
    assert (final["currentValue"], final["maxValue"]) == (5, 5)
    bad = await run_generate("x", "--param", "no-equals-sign")
    assert bad.returncode == 2
    assert b"expected NAME=VALUE" in bad.stderr


async def test_a_param_value_that_is_not_json_is_text(tmp_path: Path) -> None:
    # Python's JSON reader also takes NaN, Infinity and -Infinity, which are not
    # JSON: the client sent them as numbers, and the daemon refused the request
    # ("negativePrompt: must be a string") instead of getting the text written.
    async with running_daemon(tmp_path) as daemon:
        done = await run_generate(
            "a red fox", "--server", daemon.url, "--param", "negativePrompt=NaN", "--seed", "7"
        )
        assert done.returncode == 0, done.stderr.decode()
        actor = daemon.app.registry.get(only_task(daemon))
        assert actor is not None
        graph = json.dumps(actor.state.spec.graph)
    assert '"text": "NaN"' in graph


async def test_a_download_that_stalls_fails_instead_of_hanging(tmp_path: Path) -> None:
    # A connection that drops without a FIN or RST (a laptop changing networks,
    # a NAT forgetting it) looks like a server that stops sending. The client
    # read the image with no idle limit and hung for good. (The real clock: the
    # file is written in a thread, which the autojump clock would jump past.)
    async def half_an_image(stream: trio.SocketStream) -> None:
        await stream.receive_some()  # the request head
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
            + b"\x89PNG\r\n\x1a\n"
        )
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, half_an_image, 0, host="127.0.0.1"))
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/image/a.png"
        target = tmp_path / "fox.png"
        client = GenerateClient(
            Options(prompt="a red fox"),
            display=Display(io.StringIO(), tty=False, clock=trio.current_time),
            out=io.StringIO(),
            idle_timeout=0.5,
        )
        with pytest.raises(ClientFailure, match="stalled"):
            await client.download(url, target)
        nursery.cancel_scope.cancel()
    left = list(await trio.Path(tmp_path).iterdir())
    assert left == [], "no image and no partial file left behind"


async def test_a_progress_stream_gone_quiet_is_asked_again_from_the_last_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The same silent drop on the progress stream: past the idle limit the client
    # reconnects with Last-Event-ID instead of waiting for good.
    asked_from: list[str | None] = []
    progress = {"taskId": "t1", "status": "processing", "progress": {"currentValue": 1}}
    complete = {"taskId": "t1", "status": "completed", "result": {"imageUrl": "/image/a.png"}}

    async def stream_then_silence(stream: trio.SocketStream) -> None:
        head = (await stream.receive_some()).decode()
        found = re.search(r"(?im)^last-event-id: *(\S+)", head)
        asked_from.append(found.group(1) if found else None)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        event = (
            ("retry: 1000\nid: 1\nevent: progress\ndata: " + json.dumps(progress) + "\n\n")
            if found is None
            else ("id: 2\nevent: complete\ndata: " + json.dumps(complete) + "\n\n")
        ).encode()
        await stream.send_all(b"%x\r\n%s\r\n" % (len(event), event))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, stream_then_silence, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        shown = io.StringIO()
        client = GenerateClient(
            Options(prompt="a red fox", server=f"http://127.0.0.1:{port}"),
            display=Display(shown, tty=False, clock=trio.current_time),
            out=io.StringIO(),
            idle_timeout=5.0,
        )
        final = await client.follow("t1")
        nursery.cancel_scope.cancel()
    assert final == complete
    assert asked_from == [None, "1"]
    assert "nothing received for 5 s; reconnecting" in shown.getvalue()


async def test_a_retry_of_0_still_gives_a_restarting_daemon_time_to_come_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A daemon with sse_retry_ms = 0 says `retry: 0`. The client doubled that 0
    # between reconnects, so its ten went in the same instant: a daemon draining
    # for a restart ended the stream, and before it was back the client had
    # given up ("lost the progress stream", exit 1) on a task that went on.
    progress = {"taskId": "t1", "status": "processing", "progress": {"currentValue": 1}}
    complete = {"taskId": "t1", "status": "completed", "result": {"imageUrl": "/image/a.png"}}
    back_at = trio.current_time() + 5.0
    answered: list[int] = []

    async def restarting(stream: trio.SocketStream) -> None:
        await stream.receive_some()  # the request head
        if answered and trio.current_time() < back_at:
            answered.append(503)
            await stream.send_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            return
        payload, event = (complete, "complete") if answered else (progress, "progress")
        answered.append(200)
        body = f"retry: 0\nid: {len(answered)}\nevent: {event}\ndata: {json.dumps(payload)}\n\n"
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
            + body.encode()
        )

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, restarting, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        client = GenerateClient(
            Options(prompt="a red fox", server=f"http://127.0.0.1:{port}"),
            display=Display(io.StringIO(), tty=False, clock=trio.current_time),
            out=io.StringIO(),
        )
        final = await client.follow("t1")
        nursery.cancel_scope.cancel()
    assert final == complete
    assert answered[0] == answered[-1] == 200
    assert 503 in answered
