"""Synchronous unit tests of the simulator's pure parts."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.simulator.control import ControlError, parse_control
from daemon.simulator.files import FileStore, PathEscape, annotated_filepath
from daemon.simulator.graph import ExecutionList, signatures
from daemon.simulator.multipart import FilePart, parse_form
from daemon.simulator.nodes import NodeEnv, build_catalogue
from daemon.simulator.png import encode_png, png_size
from daemon.simulator.validation import PromptCrash, validate_prompt
from daemon.simulator.values import Pattern
from tests.simulator.conftest import probe_graph

CATALOGUE = build_catalogue()


def decode_png(data: bytes) -> tuple[int, int, bytes, dict[bytes, bytes]]:
    """(width, height, unfiltered RGB bytes, text chunks), checking every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, texts = 8, b"", {}
    width = height = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        if kind == b"IHDR":
            width, height, depth, color, _, _, _ = struct.unpack(">IIBBBBB", body)
            assert (depth, color) == (8, 2)
        elif kind == b"IDAT":
            idat += body
        elif kind in (b"tEXt", b"iTXt"):
            key, _, value = body.partition(b"\x00")
            texts[key] = value
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    assert len(raw) == stride * height
    assert all(raw[y * stride] == 0 for y in range(height))  # filter type 0
    pixels = b"".join(raw[y * stride + 1 : (y + 1) * stride] for y in range(height))
    return width, height, pixels, texts


@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.integers(0, 0xFFFFFF),
    st.none() | st.integers(0, 2**62),
)
def test_png_round_trip(width: int, height: int, color: int, seed: int | None) -> None:
    rows = Pattern(color, seed).rows(width, height)
    data = encode_png(width, height, rows, text={"prompt": '{"é": 1}', "k": "v"})
    w, h, pixels, texts = decode_png(data)
    assert (w, h) == (width, height) == png_size(data)
    assert pixels == b"".join(rows)
    assert texts[b"k"] == b"v"
    assert b"prompt" in texts


def test_patterns_are_deterministic_and_varied() -> None:
    flat = Pattern(0x112233).rows(4, 2)
    assert flat == [bytes((0x11, 0x22, 0x33)) * 4] * 2
    a, b = Pattern(1, 99).rows(64, 64), Pattern(1, 99).rows(64, 64)
    assert a == b
    assert Pattern(1, 100).rows(64, 64) != a
    assert Pattern(1, 99).variant(1) != Pattern(1, 99)
    assert png_size(b"not a png") is None
    with pytest.raises(ValueError, match="rows"):
        encode_png(2, 2, [b"\x00" * 6])


def test_file_store_counters_uploads_and_escapes() -> None:
    files = FileStore()
    assert files.next_counter("output", "", "probe") == 1
    files.put("output", "", "probe_00001_.png", b"a")
    files.put("output", "", "probe_00007_.png", b"b")
    files.put("output", "", "probe_two_00009_.png", b"c")
    files.put("output", "sub", "probe_00042_.png", b"d")
    assert files.next_counter("output", "", "probe") == 8
    assert files.next_counter("output", "", "PROBE") == 8  # case-insensitive like normcase
    assert files.next_counter("output", "sub", "probe") == 43
    assert files.save_path("portraits/cat") == ("portraits", "cat")
    with pytest.raises(PathEscape):
        files.save_path("../../etc/cat")
    assert files.upload("input", "", "a.png", b"1", overwrite=False) == "a.png"
    assert files.upload("input", "", "a.png", b"1", overwrite=False) == "a.png"
    assert files.upload("input", "", "a.png", b"2", overwrite=False) == "a (1).png"
    assert files.upload("input", "", "a.png", b"3", overwrite=False) == "a (2).png"
    assert files.upload("input", "", "a.png", b"2", overwrite=False) == "a (1).png"
    assert files.upload("input", "", "a.png", b"4", overwrite=True) == "a.png"
    assert files.get("input", "", "a.png") == b"4"
    assert files.get("input", "..", "a.png") is None
    assert sorted(files.names_in("input")) == ["a (1).png", "a (2).png", "a.png"]
    assert annotated_filepath("x.png [output]") == ("x.png", "output")


def test_file_store_drops_the_oldest_generated_files() -> None:
    files = FileStore(max_generated=2)
    files.put("input", "", "upload.png", b"u")
    files.put("output", "", "a.png", b"a")
    files.put("temp", "", "b.png", b"b")
    files.put("output", "", "a.png", b"a2")  # replacing refreshes its age
    files.put("output", "", "c.png", b"c")
    assert files.get("temp", "", "b.png") is None
    assert files.get("output", "", "a.png") == b"a2"
    assert files.get("output", "", "c.png") == b"c"
    assert files.get("input", "", "upload.png") == b"u"  # uploads have their own budget
    files.clear("output")
    files.put("temp", "", "d.png", b"d")
    assert files.count() == 2
    assert annotated_filepath("x.png") == ("x.png", None)


def test_file_store_keeps_uploads_within_their_byte_budget() -> None:
    """The embedded simulator kept every upload the daemon forwarded, forever."""
    files = FileStore(max_input_bytes=10)
    files.upload("input", "", "a.png", b"aaaa", overwrite=True)
    files.upload("input", "", "b.png", b"bbbb", overwrite=True)
    files.upload("input", "", "a.png", b"AAAA", overwrite=True)  # replaced: the newest again
    files.upload("input", "", "c.png", b"cccc", overwrite=True)
    assert files.get("input", "", "b.png") is None  # the oldest went
    assert files.get("input", "", "a.png") == b"AAAA"
    assert files.get("input", "", "c.png") == b"cccc"
    assert files.input_bytes == 8
    files.upload("input", "", "huge.png", b"x" * 50, overwrite=True)
    assert files.names_in("input") == ["huge.png"]  # the newest stays, even alone over budget
    files.clear("input")
    assert files.input_bytes == 0


def test_multipart_parser() -> None:
    body = (
        b"preamble\r\n--B\r\n"
        b'Content-Disposition: form-data; name="image"; filename="q \\"x\\".png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x00\r\n\r\nbin\r\n"
        b'--B\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\ntrue\r\n'
        b'--B\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\nfalse\r\n'
        b"--B--\r\nepilogue"
    )
    fields = parse_form('multipart/form-data; boundary="B"', body)
    assert fields == {"image": FilePart('q "x".png', b"\x00\r\n\r\nbin"), "overwrite": "true"}
    assert parse_form("application/json", b"{}") == {}
    assert parse_form("multipart/form-data", b"") == {}


def test_parse_control() -> None:
    parsed = parse_control({"restart": True, "step_time": None, "fail_at": "", "grant_steps": 2})
    assert list(parsed) == ["step_time", "fail_at", "restart", "grant_steps"]  # apply order
    assert parsed["fail_at"] is None
    with pytest.raises(ControlError):
        parse_control({"reject_connections": float("inf")})
    with pytest.raises(ControlError):
        parse_control({"drop_websockets": 1})


def _order(prompt: dict[str, Any], cached: frozenset[str] = frozenset()) -> list[str]:
    outputs = [n for n, node in prompt.items() if CATALOGUE[node["class_type"]].output_node]
    execution = ExecutionList(
        prompt,
        is_cached=lambda n: n in cached,
        is_output=lambda n: CATALOGUE[prompt[n]["class_type"]].output_node,
    )
    for node_id in outputs:
        execution.add_node(node_id)
    order = []
    while not execution.is_empty():
        order.append(execution.stage())
        execution.complete()
    return order


def test_execution_order_matches_comfyui() -> None:
    # s12: two SaveImages; the one fed by node 2 runs as soon as it can.
    graph = probe_graph()
    graph["3"] = {
        "class_type": "SlowProgress",
        "inputs": {"image": ["2", 0], "steps": 2, "delay": 0},
    }
    graph["4"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "a"}}
    graph["5"] = {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "b"}}
    assert _order(graph) == ["1", "2", "5", "3", "4"]
    # Cached ancestors are never staged; the output node always is.
    assert _order(probe_graph(), frozenset({"1", "2"})) == ["3"]
    assert _order(probe_graph(), frozenset({"1", "2", "3"})) == ["3"]


def test_signatures_follow_content_not_ids() -> None:
    env = NodeEnv(("m.ckpt",), FileStore())
    a = signatures(probe_graph(), CATALOGUE, env)
    renumbered = {
        "10": probe_graph()["1"],
        "20": {
            **probe_graph()["2"],
            "inputs": {**probe_graph()["2"]["inputs"], "image": ["10", 0]},
        },
        "30": {**probe_graph()["3"], "inputs": {"images": ["20", 0], "filename_prefix": "probe"}},
    }
    b = signatures(renumbered, CATALOGUE, env)
    assert (a["1"], a["2"], a["3"]) == (b["10"], b["20"], b["30"])
    assert signatures(probe_graph(color=1), CATALOGUE, env)["2"] != a["2"]  # upstream changed
    dangling = probe_graph()
    dangling["9"] = {"class_type": "SaveImage", "inputs": {"images": ["404", 0]}}
    assert signatures(dangling, CATALOGUE, env)["9"] != signatures(dangling, CATALOGUE, env)["9"]


def test_validation_crashes_where_comfyui_crashes() -> None:
    env = NodeEnv(("m.ckpt",), FileStore())
    with pytest.raises(PromptCrash):
        validate_prompt(probe_graph(), 5, CATALOGUE, env)  # partial targets not a list
    with pytest.raises(PromptCrash):
        validate_prompt({"1": 7}, None, CATALOGUE, env)
    result = validate_prompt(probe_graph(), ["nope"], CATALOGUE, env)
    assert result.error is not None
    assert result.error["type"] == "prompt_no_outputs"
    converted = probe_graph()
    converted["2"]["inputs"]["steps"] = "4"
    converted["2"]["inputs"]["delay"] = {"__value__": 1}
    assert validate_prompt(converted, None, CATALOGUE, env).ok
    assert converted["2"]["inputs"]["steps"] == 4
    assert converted["2"]["inputs"]["delay"] == 1.0
