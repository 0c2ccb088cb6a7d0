"""The HTTP client: requests, streams, and every failure as one HttpClientError."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio

from daemon.http import (
    BodyWriter,
    HttpClientError,
    Request,
    Response,
    Router,
    StreamingResponse,
    http_request,
    json_response,
    open_stream,
)
from tests.daemon.http.helpers import start_server


async def start_raw_server(
    nursery: trio.Nursery, talk: Callable[[trio.SocketStream], Awaitable[None]]
) -> str:
    """A TCP server running `talk` on each connection; returns its base URL."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    host, port = listeners[0].socket.getsockname()[:2]

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            await talk(stream)

    await nursery.start(trio.serve_listeners, handle, listeners)
    return f"http://{host}:{port}"


def echo_app() -> Router:
    async def echo(request: Request) -> Response:
        return json_response(
            200,
            {
                "method": request.method,
                "target": request.target,
                "host": request.headers.get("host"),
                "length": request.headers.get("content-length"),
                "agent": request.headers.get("user-agent"),
                "custom": request.headers.get("x-custom"),
                "body": request.body.decode(),
            },
        )

    async def big(request: Request) -> Response:
        return Response(200, [], b"z" * 5000)

    router = Router()
    router.add("GET", "/echo", echo)
    router.add("POST", "/echo", echo)
    router.add("GET", "/big", big)
    return router


async def test_request_sends_host_length_and_body(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, echo_app())
    response = await http_request(
        "post", f"{running.url}/echo?q=1", headers=[("X-Custom", "yes")], body=b"payload"
    )
    assert response.status == 200
    assert response.json() == {
        "method": "POST",
        "target": "/echo?q=1",
        "host": f"127.0.0.1:{running.port}",
        "length": "7",
        "agent": "comfy-progress",
        "custom": "yes",
        "body": "payload",
    }
    assert response.text().startswith("{")


async def test_empty_post_still_declares_its_length(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, echo_app())
    response = await http_request("POST", f"{running.url}/echo")
    assert response.json()["length"] == "0"
    get = await http_request("GET", f"{running.url}/echo")
    assert get.json()["length"] is None


async def test_connection_refused_is_an_http_client_error() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # nothing listens there any more
    url = f"http://127.0.0.1:{port}/x"
    with pytest.raises(HttpClientError, match="cannot connect") as caught:
        await http_request("GET", url)
    assert url in str(caught.value)
    assert caught.value.url == url


async def test_a_silent_server_times_out(nursery: trio.Nursery) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    url = await start_raw_server(nursery, silent)
    with pytest.raises(HttpClientError, match="timed out"):
        await http_request("GET", url + "/", timeout=0.05)


async def test_an_oversized_response_is_refused(nursery: trio.Nursery) -> None:
    running = await start_server(nursery, echo_app())
    with pytest.raises(HttpClientError, match="larger than 1000 bytes"):
        await http_request("GET", f"{running.url}/big", max_response_bytes=1000)
    ok = await http_request("GET", f"{running.url}/big", max_response_bytes=5000)
    assert len(ok.body) == 5000


async def test_garbage_from_the_server_is_a_protocol_error(nursery: trio.Nursery) -> None:
    async def garbage(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(b"SPEAKING NONSENSE\r\n\r\n")

    url = await start_raw_server(nursery, garbage)
    with pytest.raises(HttpClientError, match="protocol error"):
        await http_request("GET", url + "/")


async def test_server_closing_without_an_answer_is_an_error(nursery: trio.Nursery) -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.receive_some()

    url = await start_raw_server(nursery, hang_up)
    with pytest.raises(HttpClientError, match="without answering"):
        await http_request("GET", url + "/")


async def test_server_closing_mid_body_is_an_error(nursery: trio.Nursery) -> None:
    async def truncated(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

    url = await start_raw_server(nursery, truncated)
    with pytest.raises(HttpClientError):
        await http_request("GET", url + "/")


async def test_close_delimited_response_is_read_to_eof(nursery: trio.Nursery) -> None:
    async def old_style(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")

    url = await start_raw_server(nursery, old_style)
    response = await http_request("GET", url + "/")
    assert response.body == b"until the end"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://example.com/", "only http://"),
        ("ftp://example.com/", "only http://"),
        ("http:///nohost", "no host"),
        ("http://example.com:99999/", "invalid URL"),
    ],
)
async def test_unsupported_urls_are_refused(url: str, reason: str) -> None:
    with pytest.raises(HttpClientError, match=reason):
        await http_request("GET", url)


async def test_open_stream_yields_chunks_as_they_come(nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def events(writer: BodyWriter) -> None:
        await writer.send(b"one")
        await release.wait()
        await writer.send(b"two")

    async def handler(request: Request) -> StreamingResponse:
        return StreamingResponse(201, [("x-kind", "events")], events)

    router = Router()
    router.add("GET", "/events", handler)
    running = await start_server(nursery, router)
    async with open_stream("GET", f"{running.url}/events") as response:
        assert response.status == 201
        assert response.headers.get("x-kind") == "events"
        assert await response.chunks.__anext__() == b"one"
        release.set()
        assert [chunk async for chunk in response.chunks] == [b"two"]
        assert response.chunks.complete
        # Iterating past the end stays ended.
        assert [chunk async for chunk in response.chunks] == []


async def test_open_stream_ends_quietly_when_the_server_closes(nursery: trio.Nursery) -> None:
    async def cut(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")

    url = await start_raw_server(nursery, cut)
    async with open_stream("GET", url + "/") as response:
        assert [chunk async for chunk in response.chunks] == [b"abc"]
        assert not response.chunks.complete


async def test_open_stream_connect_errors_are_http_client_errors() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    with pytest.raises(HttpClientError, match="cannot connect"):
        async with open_stream("GET", f"http://127.0.0.1:{port}/"):
            pass


async def test_open_stream_head_timeout(nursery: trio.Nursery) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    url = await start_raw_server(nursery, silent)
    with pytest.raises(HttpClientError, match="timed out"):
        async with open_stream("GET", url + "/", timeout_connect=0.05):
            pass
