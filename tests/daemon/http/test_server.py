"""HttpServer end to end on real sockets: routing, keep-alive, pipelining, limits, errors."""

from __future__ import annotations

import json
import logging
import socket
import struct

import h11
import pytest
import trio
import trio.testing

from daemon.http import (
    HttpLimits,
    Request,
    Response,
    Router,
    error_response,
    http_request,
    json_response,
)
from daemon.http.types import HandlerResult
from tests.daemon.http.helpers import H11Client, header, read_until_eof, start_server

SMALL_BODY_LIMIT = 1024
# More than a loopback socket takes at once: written partly at once, the rest as it drains.
HUGE_BODY = bytes(range(256)) * (32 * 1024 * 4)


class Boom(RuntimeError):
    pass


def make_app(seen: list[Request] | None = None) -> Router:
    async def hello(request: Request) -> Response:
        if seen is not None:
            seen.append(request)
        return json_response(
            200,
            {
                "name": request.path_params["name"],
                "query": dict(request.query),
                "path": request.path,
            },
        )

    async def echo(request: Request) -> Response:
        if seen is not None:
            seen.append(request)
        return Response(200, [("content-type", "application/octet-stream")], request.body)

    async def boom(request: Request) -> Response:
        raise Boom("secret detail: password=hunter2")

    async def bad_header(request: Request) -> Response:
        return Response(200, [("x-bad", "line\r\nbreak")], b"x")

    async def not_a_response(request: Request) -> Response:
        return "nope"  # type: ignore[return-value]

    async def no_content(request: Request) -> Response:
        return Response(204, [], b"ignored")

    async def huge(request: Request) -> Response:
        return Response(200, [("content-type", "application/octet-stream")], HUGE_BODY)

    router = Router()
    router.add("GET", "/hello/{name}", hello)
    router.add("POST", "/echo", echo)
    router.add("POST", "/small", echo, max_body=16)
    router.add("POST", "/large", echo, max_body=4 * SMALL_BODY_LIMIT)
    router.add("GET", "/boom", boom)
    router.add("GET", "/bad-header", bad_header)
    router.add("GET", "/not-a-response", not_a_response)
    router.add("GET", "/no-content", no_content)
    router.add("GET", "/huge", huge)
    return router


LIMITS = HttpLimits(max_body_bytes=SMALL_BODY_LIMIT, max_header_bytes=4096)


async def test_get_is_routed_with_decoded_params_and_query(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    response = await http_request("GET", f"{running.url}/hello/w%C3%B6rld?x=1&x=2&y=")
    assert response.status == 200
    assert response.json() == {
        "name": "wörld",
        "query": {"x": "1", "y": ""},
        "path": "/hello/wörld",
    }
    assert response.headers.get("content-type") == "application/json"
    assert response.headers.get("content-length") == str(len(response.body))
    assert response.headers.get("server") == "comfy-progress"
    assert response.headers.get("date", "").endswith(" GMT")


async def test_unknown_path_is_404_json(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    response = await http_request("GET", f"{running.url}/nowhere")
    assert response.status == 404
    assert response.json() == {"error": {"message": "not found", "details": {"path": "/nowhere"}}}


async def test_known_path_with_other_method_is_405_with_allow(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    response = await http_request("DELETE", f"{running.url}/hello/x")
    assert response.status == 405
    assert response.headers.get("allow") == "GET, HEAD"
    assert response.json()["error"]["message"] == "method not allowed"


async def test_head_is_served_by_get_without_body_but_with_length(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    get = await http_request("GET", f"{running.url}/hello/x")
    head = await http_request("HEAD", f"{running.url}/hello/x")
    assert head.status == 200
    assert head.body == b""
    assert head.headers.get("content-length") == str(len(get.body))


async def test_204_has_no_body_and_no_length(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        head, body = await H11Client(stream).request("GET", "/no-content")
    assert head.status_code == 204
    assert body == b""
    assert header(head, "content-length") is None


async def test_keep_alive_serves_two_requests_on_one_connection(nursery: trio.Nursery) -> None:
    seen: list[Request] = []
    running = await start_server(nursery, make_app(seen), LIMITS)
    async with await running.connect() as stream:
        client = H11Client(stream)
        first, first_body = await client.request("GET", "/hello/one")
        client.h11.start_next_cycle()
        second, second_body = await client.request("GET", "/hello/two")
    assert (first.status_code, second.status_code) == (200, 200)
    assert json.loads(first_body)["name"] == "one"
    assert json.loads(second_body)["name"] == "two"
    assert header(first, "connection") is None
    assert seen[0].peer == seen[1].peer  # the same connection


async def test_a_keep_alive_request_sent_in_pieces_is_read_whole(nursery: trio.Nursery) -> None:
    # Between keep-alive requests the server waits for the socket to be readable
    # before it reads: a next request arriving a few bytes at a time still works.
    seen: list[Request] = []
    running = await start_server(nursery, make_app(seen), LIMITS)
    async with await running.connect() as stream:
        client = H11Client(stream)
        first, _ = await client.request("GET", "/hello/one")
        client.h11.start_next_cycle()
        raw = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        for start in range(0, len(raw), 7):
            await stream.send_all(raw[start : start + 7])
            await trio.testing.wait_all_tasks_blocked()
        reply = b""
        while not reply.endswith(b"hello"):
            reply += await stream.receive_some(4096)
    assert first.status_code == 200
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert seen[-1].body == b"hello"


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_peer_gone_between_keep_alive_requests_ends_quietly(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    stream = await running.connect()
    client = H11Client(stream)
    head, _ = await client.request("GET", "/hello/one")
    assert head.status_code == 200
    await trio.testing.wait_all_tasks_blocked()  # the server waits for the next request
    if how == "reset":
        # SO_LINGER 0: close() sends a reset instead of a FIN.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()
    with trio.fail_after(10):  # a hang guard: the server notices the end by itself
        while running.server.active_connections:
            await trio.testing.wait_all_tasks_blocked()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_reused_response_heads_still_fit_each_response(nursery: trio.Nursery) -> None:
    # Heads are kept and reused (see H11Connection.response_head): each response
    # still gets its own status, length and headers.
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        client = H11Client(stream)
        answers = []
        for body in (b"abc", b"abc", b"abcdef", b"", b"abc"):
            answers.append(await client.request("POST", "/echo", body=body))
            client.h11.start_next_cycle()
        answers.append(await client.request("GET", "/hello/x"))
    assert [
        (head.status_code, header(head, "content-length"), body) for head, body in answers[:5]
    ] == [
        (200, "3", b"abc"),
        (200, "3", b"abc"),
        (200, "6", b"abcdef"),
        (200, "0", b""),
        (200, "3", b"abc"),
    ]
    assert header(answers[0][0], "content-type") == "application/octet-stream"
    assert header(answers[5][0], "content-type") == "application/json"


async def test_header_pairs_given_as_lists_are_sent(nursery: trio.Nursery) -> None:
    async def listed(request: Request) -> Response:
        return Response(200, [["x-listed", "yes"]], b"ok")  # type: ignore[list-item]

    router = Router()
    router.add("GET", "/listed", listed)
    running = await start_server(nursery, router, LIMITS)
    async with await running.connect() as stream:
        client = H11Client(stream)
        for _ in range(2):
            head, body = await client.request("GET", "/listed")
            client.h11.start_next_cycle()
            assert (head.status_code, header(head, "x-listed"), body) == (200, "yes", b"ok")


async def test_a_response_larger_than_the_socket_takes_arrives_whole(
    nursery: trio.Nursery,
) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        client = H11Client(stream)
        await client.send_request("GET", "/huge")
        # The server wrote what the socket took and waits for the rest to drain.
        await trio.testing.wait_all_tasks_blocked()
        head, body = await client.read_response()
        assert head.status_code == 200
        assert body == HUGE_BODY
        client.h11.start_next_cycle()
        again, _ = await client.request("GET", "/hello/after")  # the connection is intact
        assert again.status_code == 200


async def test_pipelined_requests_are_answered_in_order(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        await stream.send_all(
            b"GET /hello/a HTTP/1.1\r\nHost: t\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /hello/c HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        client = H11Client(stream)
        bodies = []
        for _ in range(3):
            client.pretend_sent()
            head, body = await client.read_response()
            assert head.status_code == 200
            bodies.append(body)
            if client.h11.our_state is h11.DONE and client.h11.their_state is h11.DONE:
                client.h11.start_next_cycle()
        assert json.loads(bodies[0])["name"] == "a"
        assert bodies[1] == b"hello"
        assert json.loads(bodies[2])["name"] == "c"
        assert await read_until_eof(stream) == b""


async def test_expect_100_continue_gets_100_before_the_body(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        client = H11Client(stream)
        await client.send(
            h11.Request(
                method="POST",
                target="/echo",
                headers=[("host", "t"), ("content-length", "4"), ("expect", "100-continue")],
            )
        )
        interim = await client.next_event()
        assert isinstance(interim, h11.InformationalResponse)
        assert interim.status_code == 100
        await client.send(h11.Data(data=b"ping"), h11.EndOfMessage())
        head, body = await client.read_response()
    assert head.status_code == 200
    assert body == b"ping"


async def test_expect_100_continue_with_too_large_body_gets_413_and_no_100(
    nursery: trio.Nursery,
) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        client = H11Client(stream)
        await client.send(
            h11.Request(
                method="POST",
                target="/echo",
                headers=[
                    ("host", "t"),
                    ("content-length", str(SMALL_BODY_LIMIT + 1)),
                    ("expect", "100-continue"),
                ],
            )
        )
        head = await client.next_event()
        assert isinstance(head, h11.Response)
        assert head.status_code == 413
        assert header(head, "connection") == "close"


def typed_echo_app(checked: list[str]) -> Router:
    """POST /typed: echoes text/plain bodies, and says 415 for others from the head."""

    def text_only(request: Request) -> Response | None:
        checked.append(request.path_params["name"])
        if request.headers.get("content-type") == "text/plain":
            return None
        return error_response(415, "text/plain only")

    async def echo(request: Request) -> Response:
        return text_only(request) or Response(200, [], request.body)

    router = Router()
    router.add("POST", "/typed/{name}", echo, check_head=text_only)
    return router


async def send_expecting_head(stream: trio.SocketStream, content_type: str) -> H11Client:
    client = H11Client(stream)
    await client.send(
        h11.Request(
            method="POST",
            target="/typed/x",
            headers=[
                ("host", "t"),
                ("content-type", content_type),
                ("content-length", "4"),
                ("expect", "100-continue"),
            ],
        )
    )
    return client


async def test_expect_100_continue_refused_from_the_head_gets_no_100(
    nursery: trio.Nursery,
) -> None:
    checked: list[str] = []
    running = await start_server(nursery, typed_echo_app(checked), LIMITS)
    async with await running.connect() as stream:
        client = await send_expecting_head(stream, "image/png")
        head = await client.next_event()
        assert isinstance(head, h11.Response)
        assert head.status_code == 415
        assert header(head, "connection") == "close"
        assert json.loads(await client.read_body())["error"]["message"] == "text/plain only"
        # The body is never read: the connection closes instead.
        assert await read_until_eof(stream) == b""
    assert checked == ["x"]


async def test_expect_100_continue_passing_the_head_check_gets_100(
    nursery: trio.Nursery,
) -> None:
    checked: list[str] = []
    running = await start_server(nursery, typed_echo_app(checked), LIMITS)
    async with await running.connect() as stream:
        client = await send_expecting_head(stream, "text/plain")
        interim = await client.next_event()
        assert isinstance(interim, h11.InformationalResponse)
        assert interim.status_code == 100
        await client.send(h11.Data(data=b"ping"), h11.EndOfMessage())
        head, body = await client.read_response()
    assert (head.status_code, body) == (200, b"ping")
    assert header(head, "connection") is None
    assert checked == ["x", "x"]  # before the 100, then by the handler itself


async def test_head_checks_wait_for_the_body_without_expect(nursery: trio.Nursery) -> None:
    checked: list[str] = []
    running = await start_server(nursery, typed_echo_app(checked), LIMITS)
    async with await running.connect() as stream:
        client = H11Client(stream)
        refused, _ = await client.request(
            "POST", "/typed/x", [("content-type", "image/png")], b"ping"
        )
        client.h11.start_next_cycle()
        served, _ = await client.request(
            "POST", "/typed/y", [("content-type", "text/plain")], b"ping"
        )
    # Answered by the handler with the body read: the connection stays open.
    assert (refused.status_code, served.status_code) == (415, 200)
    assert checked == ["x", "y"]


async def test_content_length_over_limit_is_413(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    response = await http_request("POST", f"{running.url}/echo", body=b"x" * (SMALL_BODY_LIMIT + 1))
    assert response.status == 413
    assert response.json()["error"]["message"] == "request body too large"


async def test_large_upload_over_limit_still_sees_its_413(nursery: trio.Nursery) -> None:
    # The server answers after the head and then reads (and drops) the rest
    # while closing, so the client's upload completes and it reads the 413
    # instead of hitting a connection reset.
    running = await start_server(nursery, make_app(), LIMITS)
    response = await http_request("POST", f"{running.url}/echo", body=b"x" * 512 * 1024)
    assert response.status == 413


async def test_body_at_the_limit_is_accepted(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    body = b"x" * SMALL_BODY_LIMIT
    response = await http_request("POST", f"{running.url}/echo", body=body)
    assert response.status == 200
    assert response.body == body


async def test_oversized_chunked_body_is_413(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        await stream.send_all(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % 600
            + b"a" * 600
            + b"\r\n"
            + b"%x\r\n" % 600
            + b"b" * 600
            + b"\r\n0\r\n\r\n"
        )
        client = H11Client(stream)
        head = await client.read_head()
    assert head.status_code == 413


async def test_small_chunked_body_is_read_whole(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        client = H11Client(stream)
        await client.send(
            h11.Request(
                method="POST",
                target="/echo",
                headers=[("host", "t"), ("transfer-encoding", "chunked")],
            ),
            h11.Data(data=b"one "),
            h11.Data(data=b"two"),
            h11.EndOfMessage(),
        )
        head, body = await client.read_response()
    assert head.status_code == 200
    assert body == b"one two"


async def test_route_max_body_overrides_the_server_limit(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    big = b"x" * (2 * SMALL_BODY_LIMIT)
    raised = await http_request("POST", f"{running.url}/large", body=big)
    assert raised.status == 200
    assert raised.body == big
    lowered = await http_request("POST", f"{running.url}/small", body=b"x" * 17)
    assert lowered.status == 413


async def test_huge_headers_are_431(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        await stream.send_all(
            b"GET /hello/x HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
        )
        head = await H11Client(stream).read_head()
    assert head.status_code == 431


async def test_endless_head_is_431_before_it_ends(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        await stream.send_all(b"GET /hello/x HTTP/1.1\r\nHost: t\r\n")
        for _ in range(10):  # never the blank line that ends the head
            await stream.send_all(b"X-More: " + b"a" * 1000 + b"\r\n")
        head = await H11Client(stream).read_head()
    assert head.status_code == 431


async def test_garbage_is_400_and_the_connection_closes(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        await stream.send_all(b"THIS IS NOT HTTP\r\n\r\n")
        raw = await read_until_eof(stream)
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"connection: close" in raw.lower()
    assert raw.endswith(b'{"error":{"message":"malformed request","details":null}}')


async def test_invalid_percent_encoding_in_path_is_400(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    response = await http_request("GET", f"{running.url}/hello/%FF%FE")
    assert response.status == 400


@pytest.mark.parametrize("target", ["http://[/hello/x", "http://]/hello/x", "http://[x]/hello/x"])
async def test_absolute_form_target_with_a_bad_authority_is_400(
    nursery: trio.Nursery, target: str
) -> None:
    # urlsplit refuses these (brackets that do not enclose an IPv6 address).
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        await stream.send_all(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % target.encode())
        raw = await read_until_eof(stream)
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"connection: close" in raw.lower()


@pytest.mark.parametrize(
    "line",
    [
        b"GET * HTTP/1.1",
        b"HEAD * HTTP/1.1",
        b"POST * HTTP/1.1",
        b"GET foo HTTP/1.1",
        b"GET index.html HTTP/1.1",
        b"GET example.com:80/x HTTP/1.1",
        b"CONNECT example.com:443 HTTP/1.1",
    ],
)
async def test_targets_neither_origin_nor_absolute_form_are_400(
    nursery: trio.Nursery, line: bytes
) -> None:
    seen: list[Request] = []

    async def record(request: Request) -> Response:
        seen.append(request)
        return Response(200, [], request.target.encode())

    running = await start_server(nursery, record, LIMITS)
    async with await running.connect() as stream:
        await stream.send_all(line + b"\r\nHost: t\r\n\r\n")
        raw = await read_until_eof(stream)
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"connection: close" in raw.lower()
    assert seen == []


async def test_options_asterisk_reaches_the_handler(nursery: trio.Nursery) -> None:
    async def record(request: Request) -> Response:
        return Response(200, [], f"{request.method} {request.target}".encode())

    running = await start_server(nursery, record, LIMITS)
    async with await running.connect() as stream:
        head, body = await H11Client(stream).request("OPTIONS", "*")
    assert head.status_code == 200
    assert body == b"OPTIONS *"


async def test_handler_exception_is_500_without_details_and_is_logged(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    with caplog.at_level(logging.ERROR, logger="daemon.http.server"):
        response = await http_request("GET", f"{running.url}/boom")
    assert response.status == 500
    assert response.json() == {"error": {"message": "internal server error", "details": None}}
    assert b"hunter2" not in response.body
    assert b"Boom" not in response.body
    [record] = [r for r in caplog.records if r.exc_info]
    assert "GET /boom" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], Boom)


class Explained:
    """A handler with the error_headers hook: what it adds to the server's own errors."""

    def __init__(self) -> None:
        self.inner = make_app()

    async def __call__(self, request: Request) -> HandlerResult:
        return await self.inner(request)

    def error_headers(self, request: Request) -> list[tuple[str, str]]:
        return [("X-Refused", f"{request.method} {request.path}")]


async def test_the_server_s_own_errors_carry_the_handler_s_error_headers(
    nursery: trio.Nursery,
) -> None:
    running = await start_server(nursery, Explained(), LIMITS)
    failed = await http_request("GET", f"{running.url}/boom")
    too_big = await http_request("POST", f"{running.url}/echo", body=b"x" * (SMALL_BODY_LIMIT + 1))
    assert (failed.status, failed.headers.get("x-refused")) == (500, "GET /boom")
    assert (too_big.status, too_big.headers.get("x-refused")) == (413, "POST /echo")


async def test_keep_alive_survives_a_500(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        client = H11Client(stream)
        first, _ = await client.request("GET", "/boom")
        client.h11.start_next_cycle()
        second, _ = await client.request("GET", "/hello/x")
    assert (first.status_code, second.status_code) == (500, 200)


@pytest.mark.parametrize("path", ["/bad-header", "/not-a-response"])
async def test_invalid_handler_results_become_500(nursery: trio.Nursery, path: str) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    response = await http_request("GET", f"{running.url}{path}")
    assert response.status == 500
    assert response.json()["error"]["message"] == "internal server error"


async def test_connection_close_from_the_client_is_honoured(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        client = H11Client(stream)
        head, _ = await client.request("GET", "/hello/x", [("connection", "close")])
        assert header(head, "connection") == "close"
        assert await read_until_eof(stream) == b""


async def test_http_1_0_gets_an_answer_and_a_close(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        await stream.send_all(b"GET /hello/old HTTP/1.0\r\n\r\n")
        raw = await read_until_eof(stream)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert raw.endswith(b'"name":"old","query":{},"path":"/hello/old"}')


@pytest.mark.parametrize("version", [b"2.0", b"3.0", b"0.9"])
async def test_other_major_http_versions_get_505_and_a_close(
    nursery: trio.Nursery, version: bytes
) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        await stream.send_all(
            b"GET /hello/x HTTP/%s\r\nHost: t\r\n\r\n" % version
            # Pipelined behind it: never answered, the connection closes first.
            + b"GET /hello/y HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        raw = await read_until_eof(stream)
    head, body = _split_raw_response(raw)
    assert head.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["message"] == "HTTP version not supported (only HTTP/1.x)"


async def test_a_higher_http_1_minor_version_is_served_as_1_1(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        await stream.send_all(b"GET /hello/x HTTP/1.2\r\nHost: t\r\nConnection: close\r\n\r\n")
        raw = await read_until_eof(stream)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_absolute_form_target_is_routed_by_its_path(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        client = H11Client(stream)
        head, body = await client.request("GET", "http://example/hello/abs?q=1")
    assert head.status_code == 200
    assert json.loads(body) == {"name": "abs", "query": {"q": "1"}, "path": "/hello/abs"}


async def test_connections_beyond_max_connections_get_503(nursery: trio.Nursery) -> None:
    running = await start_server(
        nursery, make_app(), HttpLimits(max_connections=1, max_body_bytes=SMALL_BODY_LIMIT)
    )
    async with await running.connect() as first:
        # One answered request proves the first connection is accepted and counted.
        client = H11Client(first)
        head, _ = await client.request("GET", "/hello/x")
        assert head.status_code == 200
        assert running.server.active_connections == 1
        async with await running.connect() as second:
            raw = await read_until_eof(second)
    assert raw.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"connection limit" in raw


async def test_refusals_before_routing_are_reported(nursery: trio.Nursery) -> None:
    heard: list[int] = []
    running = await start_server(nursery, make_app(), LIMITS, on_rejected=heard.append)
    too_big = await http_request("POST", f"{running.url}/echo", body=b"x" * (SMALL_BODY_LIMIT + 1))
    assert too_big.status == 413
    async with await running.connect() as garbage:
        await garbage.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        assert (await read_until_eof(garbage)).startswith(b"HTTP/1.1 400 ")
    # A server of its own for the limit: closed connections above may still
    # be lingering in their slots.
    limits = HttpLimits(max_connections=1, max_body_bytes=SMALL_BODY_LIMIT)
    single = await start_server(nursery, make_app(), limits, on_rejected=heard.append)
    async with await single.connect() as first:
        head, _ = await H11Client(first).request("GET", "/hello/x")
        assert head.status_code == 200
        async with await single.connect() as second:
            assert (await read_until_eof(second)).startswith(b"HTTP/1.1 503 ")
    # Routed requests are the router's to report, not the server's.
    assert heard == [413, 400, 503]


async def test_error_response_shape() -> None:
    response = error_response(422, "bad input", {"field": "prompt"})
    assert json.loads(response.body) == {
        "error": {"message": "bad input", "details": {"field": "prompt"}}
    }
    await trio.lowlevel.checkpoint()


def _split_raw_response(raw: bytes) -> tuple[bytes, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw
    return head, body


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(b"HEAD /%ff HTTP/1.1\r\nHost: t\r\n\r\n", 400, id="bad-target"),
        pytest.param(
            b"HEAD /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 52428800\r\n\r\n",
            413,
            id="body-too-large",
        ),
        pytest.param(
            b"HEAD /hello/x HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n",
            431,
            id="whole-head-too-large",
        ),
        pytest.param(
            b"HEAD /hello/x HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 8000,
            431,
            id="endless-head",
        ),
    ],
)
async def test_head_refused_before_routing_gets_its_status_without_a_body(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, request_bytes: bytes, status: int
) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    with caplog.at_level(logging.DEBUG):
        async with await running.connect() as stream:
            await stream.send_all(request_bytes)
            raw = await read_until_eof(stream)
    head, body = _split_raw_response(raw)
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"connection: close" in head.lower()
    assert body == b""
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_both_content_length_and_transfer_encoding_close_after_the_answer(
    nursery: trio.Nursery,
) -> None:
    running = await start_server(nursery, make_app(), LIMITS)
    async with await running.connect() as stream:
        await stream.send_all(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            # A smuggled second request: never answered.
            b"GET /hello/smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        raw = await read_until_eof(stream)
    head, body = _split_raw_response(raw)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in head.lower()
    assert body == b"abc"  # and nothing after it: the connection closed
