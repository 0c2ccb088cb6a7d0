"""Replay the captured ComfyUI transcripts against the simulator and compare.

The transcripts (tests/fixtures/comfyui/*.jsonl) are both the script and the
expected result: every `ws_open`, `ws_send`, `ws_close` and `http` record is
performed, every `ws_text`/`ws_binary` record must arrive, in order, on that
connection, equal to the captured frame up to ids, timestamps and tracebacks.

Timing is taken out of the picture with the simulator's manual-step mode: a
progress step only runs when the replayer grants it, and it grants one only
when the next expected frame has not arrived and everything else is idle
(trio.testing.wait_all_tasks_blocked). An action recorded between two frames
therefore happens between the same two steps as in the capture.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing

from daemon.simulator import ComfySimulator
from daemon.simulator.png import encode_png
from tests.simulator.helpers import Binary, Reply, WsClient, http, ws_connect

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "comfyui"
SCENARIOS = (
    "s1_success",
    "s2_cached",
    "s3_invalid",
    "s4_runtime_error",
    "s5_interrupt",
    "s6_queue_two",
    "s7_reconnect",
    "s7b_duplicate_client_id",
    "s8_previews",
    "s9_misc",
    "s10_no_client_id",
    "s11_queue_front",
    "s12_two_progress_nodes",
)
TEMP_NAME = re.compile(r"ComfyUI_temp_([a-z]{5})_")
HEX32 = re.compile(r"[0-9a-f]{32}")
# The capture's 4x4 upload and a different one (the simulator only hashes bytes).
UPLOAD_PNG = encode_png(4, 4, [bytes((200, 30, 30)) * 4] * 4)
OTHER_PNG = encode_png(4, 4, [bytes((30, 30, 200)) * 4] * 4)


class Mismatch(AssertionError):
    """The simulator said something the captured ComfyUI did not."""


def load(name: str) -> list[dict[str, Any]]:
    """A transcript's records in seq order."""
    lines = (FIXTURES / f"{name}.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines if line.strip()), key=lambda r: r["seq"])


def describe(frame: str | bytes) -> str:
    """`type [sorted data keys]` of a frame, for failure messages."""
    if isinstance(frame, bytes):
        return f"binary type {Binary.parse(frame).event_type}"
    msg = json.loads(frame)
    return f"{msg['type']} {sorted(msg['data'])}"


def _png_size(data: bytes) -> list[int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return list(struct.unpack(">II", data[16:24]))


class Replayer:
    """Runs transcripts, in order, against one simulator (state carries over)."""

    def __init__(self, sim: ComfySimulator, port: int, nursery: trio.Nursery) -> None:
        self.sim = sim
        self.port = port
        self.nursery = nursery
        self.ids: dict[str, str] = {}  # captured prompt_id / sid -> the simulator's
        self.temp_letters: dict[str, str] = {}
        self.uploads: dict[str, bytes] = {}
        self.scenario = ""
        self.seq = 0

    # ------------------------------------------------------------ driving

    async def quiesce(self) -> None:
        """Until every task (server and clients) is blocked: all frames delivered.

        A preview encoded in a worker thread leaves its task blocked but busy.
        """
        await trio.testing.wait_all_tasks_blocked(0.0005)
        while self.sim.encoding_previews:
            await trio.sleep(0.001)
            await trio.testing.wait_all_tasks_blocked(0.0005)

    async def advance(self, done: Callable[[], bool], waiting_for: str) -> None:
        """Grant steps one at a time, each after everything settled, until `done()`."""
        while True:
            await self.quiesce()
            if done():
                return
            if not self.sim.waiting_for_step:
                raise Mismatch(f"{self.where()}: waiting for {waiting_for}, but nothing runs")
            self.sim.grant_steps(1)

    async def advance_to(self, node_id: str, value: int) -> None:
        """Run steps until the running prompt's node reached `value` (lost ticks)."""

        def reached() -> bool:
            state = self.sim.running_progress().get(node_id)
            return state is not None and state["value"] >= value

        await self.advance(reached, f"node {node_id} to reach {value}")

    async def finish(self, prompt_id: str) -> None:
        """Run steps until the prompt is in history."""
        await self.advance(lambda: prompt_id in self.sim.engine.history, f"{prompt_id} to end")

    def where(self) -> str:
        return f"{self.scenario} seq {self.seq}"

    async def run(
        self, name: str, hints: dict[int, Callable[[], Awaitable[None]]] | None = None
    ) -> None:
        """Replay one transcript; raises Mismatch on the first difference."""
        self.scenario = name
        conns: dict[str, WsClient] = {}
        cursor: dict[str, int] = {}
        client_ids: dict[str, str | None] = {}
        for record in load(name):
            self.seq = record["seq"]
            if hints and self.seq in hints:
                await hints[self.seq]()
            kind = record["kind"]
            if kind == "ws_open":
                conn = record["conn"]
                client_ids[conn] = record["client_id"]
                conns[conn] = await ws_connect(self.nursery, self.port, record["client_id"])
                cursor[conn] = 0
            elif kind in ("ws_text", "ws_binary"):
                conn = record["conn"]
                frame = await self._next_frame(conns[conn], cursor[conn], record)
                cursor[conn] += 1
                if kind == "ws_text":
                    self._compare_text(record["msg"], frame, client_ids[conn] is None)
                else:
                    self._compare_binary(record["frame"], frame)
            elif kind == "ws_send":
                await conns[record["conn"]].ws.send_message(json.dumps(record["msg"]))
            elif kind == "ws_close":
                client = conns[record["conn"]]
                await client.ws.aclose()
                await client.closed.wait()
            elif kind == "ws_handshake_rejected":
                await self._rejected_handshake(record["origin"])
            elif kind == "http":
                await self._http(record)
        await self.quiesce()
        for conn, client in conns.items():
            extra = client.frames[cursor[conn] :]
            if extra:
                got = ", ".join(describe(f) for f in extra)
                raise Mismatch(f"{name}: {conn} got frames the capture did not: {got}")
        if self.sim.engine.queue.remaining():
            raise Mismatch(f"{name}: the simulator still has prompts queued at the end")

    async def _next_frame(
        self, client: WsClient, index: int, record: dict[str, Any]
    ) -> str | bytes:
        expected = record["msg"]["type"] if "msg" in record else "a binary frame"

        def arrived() -> bool:
            if len(client.frames) <= index and client.closed.is_set():
                raise Mismatch(f"{self.where()}: {record['conn']} closed, expected {expected}")
            return len(client.frames) > index

        if not arrived():
            await self.advance(arrived, f"{expected} on {record['conn']}")
        return client.frames[index]

    async def _rejected_handshake(self, origin: str) -> None:
        # A raw upgrade request: trio-websocket's client leaks its socket when rejected.
        headers = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
            ("Origin", origin),
        ]
        reply = await http(self.port, "GET", "/ws", headers=headers)
        if reply.status != 403:
            raise Mismatch(f"{self.where()}: a foreign-Origin upgrade got {reply.status}, not 403")

    # ------------------------------------------------------------ HTTP

    def _map_text(self, text: str) -> str:
        for captured, ours in self.ids.items():
            text = text.replace(captured, ours)
        return text

    def _request(self, record: dict[str, Any]) -> tuple[bytes, list[tuple[str, str]]]:
        request = record["request"]
        headers = [
            (k, v.replace("127.0.0.1:8188", f"127.0.0.1:{self.port}"))
            for k, v in (record["request_headers"] or {}).items()
        ]
        if request is None:
            return b"", headers
        if "raw" in request:
            return request["raw"].encode(), headers
        if "multipart" in request:
            boundary = "simulatortestboundary"
            parts = []
            for name, value in request["multipart"].items():
                if name in ("image", "notimage"):
                    filename = value.split(" ")[0]
                    data = OTHER_PNG if "DIFFERENT" in value else UPLOAD_PNG
                    self.uploads.setdefault(filename, data)
                    head = f'form-data; name="{name}"; filename="{filename}"'
                    parts.append(
                        f"--{boundary}\r\nContent-Disposition: {head}\r\n"
                        "Content-Type: image/png\r\n\r\n".encode()
                        + data
                        + b"\r\n"
                    )
                else:
                    head = f'form-data; name="{name}"'
                    parts.append(
                        f"--{boundary}\r\nContent-Disposition: {head}\r\n\r\n{value}\r\n".encode()
                    )
            body = b"".join(parts) + f"--{boundary}--\r\n".encode()
            headers.append(("Content-Type", f"multipart/form-data; boundary={boundary}"))
            return body, headers
        headers.append(("Content-Type", "application/json"))
        return self._map_text(json.dumps(request)).encode(), headers

    async def _http(self, record: dict[str, Any]) -> None:
        path = self._map_text(record["path"])
        if record["method"] == "GET" and path.startswith("/history/") and record.get("body"):
            await self.finish(path.removeprefix("/history/"))  # the capture polled until done
        body, headers = self._request(record)
        reply = await http(self.port, record["method"], path, body=body, headers=headers)
        self._compare_http(record, reply)

    def _compare_http(self, record: dict[str, Any], reply: Reply) -> None:
        label = f"{self.where()} ({record['label']})"
        if reply.status != record["status"]:
            raise Mismatch(f"{label}: status {reply.status}, captured {record['status']}")
        captured_headers = {k.lower(): v for k, v in record["headers"].items()}
        known_gap = "preview=" in record["path"]  # /view does not re-encode previews
        for name in ("content-type", "content-disposition"):
            if known_gap and name == "content-type":
                continue
            if captured_headers.get(name) != reply.headers.get(name):
                raise Mismatch(
                    f"{label}: {name} {reply.headers.get(name)!r}, "
                    f"captured {captured_headers.get(name)!r}"
                )
        if "body" in record and record["body"] is not None:
            actual = reply.json()
            if record["path"].startswith("/prompt") and record["method"] == "POST":
                captured_id = record["body"].get("prompt_id")
                if captured_id is not None and captured_id not in self.ids:
                    self.ids[captured_id] = actual["prompt_id"]
            if record["label"] == "system_stats":
                self._compare_shape(record["body"], actual, label)
            else:
                self._diff(record["body"], actual, label)
        elif "body_text" in record and record["body_text"] is not None:
            if reply.body.decode() != record["body_text"]:
                raise Mismatch(f"{label}: body {reply.body!r}, captured {record['body_text']!r}")
        elif record.get("body_len") == 0:
            if reply.body:
                raise Mismatch(f"{label}: body {reply.body[:40]!r}, captured an empty body")
        elif record.get("body_first16_hex", "").startswith("89504e47"):
            _png_size(reply.body)
            filename = re.search(r"filename=([^&]+)", record["path"])
            if filename and record["path"].find("type=input") >= 0:
                expected = self.uploads.get(filename.group(1))
                if expected is not None and reply.body != expected:
                    raise Mismatch(f"{label}: /view returned other bytes than were uploaded")

    @staticmethod
    def _compare_shape(expected: Any, actual: Any, label: str) -> None:
        for key in ("system", "devices"):
            exp = expected[key] if key == "system" else expected[key][0]
            act = actual[key] if key == "system" else actual[key][0]
            if sorted(exp) != sorted(act):
                raise Mismatch(f"{label}: {key} keys {sorted(act)}, captured {sorted(exp)}")

    # ------------------------------------------------------------ frames

    def _compare_text(
        self, expected: dict[str, Any], frame: str | bytes, made_up_sid: bool
    ) -> None:
        if not isinstance(frame, str):
            raise Mismatch(f"{self.where()}: got a binary frame, captured {expected['type']}")
        actual = json.loads(frame)
        if actual["type"] != expected["type"] or sorted(actual["data"]) != sorted(expected["data"]):
            raise Mismatch(
                f"{self.where()}: got {describe(frame)}, "
                f"captured {expected['type']} {sorted(expected['data'])}"
            )
        if made_up_sid and "sid" in expected["data"]:
            sid = actual["data"]["sid"]
            if not HEX32.fullmatch(sid):
                raise Mismatch(f"{self.where()}: made-up sid {sid!r} is not 32 hex digits")
            self.ids[expected["data"]["sid"]] = sid
        self._diff(expected, actual, f"{self.where()} {expected['type']}")

    def _compare_binary(self, expected: dict[str, Any], frame: str | bytes) -> None:
        where = self.where()
        if not isinstance(frame, bytes):
            raise Mismatch(f"{where}: got {describe(frame)}, captured binary {expected}")
        got = Binary.parse(frame)
        if (got.event_type, got.second_u32) != (expected["event_type"], expected["second_u32"]):
            raise Mismatch(
                f"{where}: binary ({got.event_type}, {got.second_u32}), "
                f"captured ({expected['event_type']}, {expected['second_u32']})"
            )
        if got.event_type == 3:
            node_id = got.payload[: got.second_u32].decode()
            text = got.payload[got.second_u32 :].decode()
            if (node_id, text) != (expected["node_id"], expected["text"]):
                raise Mismatch(f"{where}: text frame {(node_id, text)}")
        elif got.event_type == 1:
            if _png_size(got.payload) != expected["image_size"]:
                raise Mismatch(f"{where}: preview size {_png_size(got.payload)}")
        elif got.event_type == 4:
            metadata = json.loads(got.payload[: got.second_u32])
            self._diff(expected["metadata"], metadata, f"{where} preview metadata")
            if _png_size(got.payload[got.second_u32 :]) != expected["image_size"]:
                raise Mismatch(f"{where}: preview size")

    # ------------------------------------------------------------ value comparison

    def _diff(self, expected: Any, actual: Any, where: str, path: str = "") -> None:
        """Strict equality up to ids, timestamps, tracebacks and set orders."""

        def fail(why: str) -> Mismatch:
            return Mismatch(f"{where}: at {path or '/'}: {why}")

        if isinstance(expected, dict):
            if not isinstance(actual, dict):
                raise fail(f"expected an object, got {actual!r}")
            exp = {self.ids.get(str(k), str(k)): v for k, v in expected.items()}
            if sorted(exp) != sorted(actual):
                raise fail(f"keys {sorted(actual)}, captured {sorted(exp)}")
            for key, value in exp.items():
                sub = f"{path}/{key}"
                if key == "timestamp":
                    if not isinstance(actual[key], int):
                        raise fail(f"timestamp {actual[key]!r} is not an integer")
                elif key == "traceback":
                    if not all(isinstance(line, str) for line in actual[key]):
                        raise fail("traceback is not a list of strings")
                elif key == "current_inputs":
                    shape = {k: len(v) for k, v in value.items()}
                    if {k: len(v) for k, v in actual[key].items()} != shape:
                        raise fail(f"current_inputs {actual[key]!r}")
                elif key in ("current_outputs", "executed"):
                    self._diff(sorted(value), sorted(actual[key]), where, sub)
                else:
                    self._diff(value, actual[key], where, sub)
            return
        if isinstance(expected, list):
            if not isinstance(actual, list) or len(actual) != len(expected):
                raise fail(f"got {actual!r}, captured {expected!r}")
            if _is_queue_item(expected) and _is_queue_item(actual):
                # The output-node list is a Python set in ComfyUI: its order varies.
                expected = [*expected[:4], sorted(expected[4])]
                actual = [*actual[:4], sorted(actual[4])]
            for i, (exp_item, act_item) in enumerate(zip(expected, actual, strict=True)):
                self._diff(exp_item, act_item, where, f"{path}[{i}]")
            return
        if isinstance(expected, str):
            expected = self.ids.get(expected, expected)
            match = TEMP_NAME.search(expected)
            if match and isinstance(actual, str) and (ours := TEMP_NAME.search(actual)):
                letters = self.temp_letters.setdefault(match.group(1), ours.group(1))
                expected = expected.replace(match.group(1), letters)
        if type(expected) is not type(actual) or expected != actual:
            raise fail(f"got {actual!r}, captured {expected!r}")


def _is_queue_item(value: list[Any]) -> bool:
    return (
        len(value) == 5
        and isinstance(value[1], str)
        and isinstance(value[2], dict)
        and isinstance(value[4], list)
    )


def hints_for(name: str, replayer: Replayer) -> dict[int, Callable[[], Awaitable[None]]]:
    """Timing the transcript implies but cannot show, per scenario."""
    if name == "s7_reconnect":
        # A was away while ticks 4-6 ran; the reconnected socket's first tick is 7.
        return {27: lambda: replayer.advance_to("2", 6)}
    return {}
