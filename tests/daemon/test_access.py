"""Cross-site requests against the real daemon: Content-Type, Origin, Host, CORS, API tokens.

Requests go over real sockets; where a test needs a Host header other than the
URL's (a proxy's, a rebinding attacker's), it writes the request by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from daemon.api.access import own_origin, parse_origin, split_host
from daemon.config import ConfigError, load, render_toml
from daemon.http.client import ClientResponse, http_request, open_stream
from daemon.http.types import Headers, Request
from tests.daemon.harness import Daemon, payloads, running_daemon

APP = "http://app.example:3000"  # a web app of the user's own, on another origin
TOKEN = "0123456789abcdef0123456789abcdef"
JSON = ("Content-Type", "application/json")
FOX = json.dumps({"prompt": "a red fox"}).encode()


@dataclass
class RawAnswer:
    status: int
    headers: Headers
    body: bytes

    def json(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.body)
        return decoded


async def raw_request(daemon: Daemon, head: str, body: bytes = b"") -> RawAnswer:
    """Send `head` (request line and headers, no blank line) exactly as written."""
    lines = f"{head}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return await raw_exchange(daemon, lines.encode("latin-1") + body)


async def raw_exchange(daemon: Daemon, data: bytes) -> RawAnswer:
    """Send `data` as it is, read the answer until the daemon closes."""
    stream = await trio.open_tcp_stream(daemon.bound.host, daemon.bound.port)
    async with stream:
        await stream.send_all(data)
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
    head_bytes, _, rest = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    headers = Headers(
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(":") for line in header_lines)
    )
    return RawAnswer(int(status_line.split()[1]), headers, rest)


async def rejected(daemon: Daemon, status: int) -> float:
    """The daemon's own count of requests refused with `status`, from /metrics."""
    text = (await daemon.request("GET", "/metrics")).text()
    for line in text.splitlines():
        if line.startswith("comfy_progress_http_rejected_total") and f'"{status}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def post(
    daemon: Daemon, path: str, *headers: tuple[str, str], body: bytes = FOX
) -> ClientResponse:
    return await http_request("POST", daemon.url + path, headers=headers, body=body, timeout=10)


# ---------------------------------------------------------------- Content-Type


async def test_a_post_without_content_type_is_refused(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        bare = await post(daemon, "/generate")
        assert bare.status == 415
        assert "application/json" in bare.json()["error"]["message"]
        plain = await post(daemon, "/generate", ("Content-Type", "text/plain"))
        assert plain.status == 415
        assert (await post(daemon, "/generate", JSON)).status == 202
        # /upload keeps its own types: an image's, never JSON or none.
        assert (await post(daemon, "/upload", body=b"\x89PNG")).status in (400, 415)
        assert daemon.app.registry.created == 1


# ---------------------------------------------------------------- Origin


async def test_the_daemons_own_origin_is_allowed_and_others_are_refused(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        own = await post(daemon, "/generate", JSON, ("Origin", daemon.url))
        assert own.status == 202
        assert own.headers.get("access-control-allow-origin") is None  # same origin: no CORS
        assert "Origin" in own.headers.get_all("vary")
        port = daemon.bound.port
        for foreign in (
            "http://evil.example",
            f"http://evil.example:{port}",
            f"http://localhost:{port}",  # the same machine by another name is another origin
            f"http://127.0.0.1:{port + 1}",
            f"https://127.0.0.1:{port}",
            "null",
            "garbage",
        ):
            refused = await post(daemon, "/generate", JSON, ("Origin", foreign))
            assert refused.status == 403, foreign
            assert refused.json()["error"]["details"]["origin"] == foreign
            assert refused.headers.get("access-control-allow-origin") is None
        # Reading is refused to a foreign page too (an EventSource sends Origin).
        task_id = own.json()["taskId"]
        stream = await http_request(
            "GET",
            f"{daemon.url}/progress/{task_id}",
            headers=[("Origin", "http://evil.example")],
            timeout=10,
        )
        assert stream.status == 403
        assert daemon.app.registry.created == 1
        assert await rejected(daemon, 403) == 8


async def test_behind_a_proxy_the_origin_is_compared_with_host_and_scheme(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        for host, proto, origin, status in (
            ("comfy.example", "https", "https://comfy.example", 202),
            ("comfy.example:8443", "https", "https://comfy.example:8443", 202),
            ("Comfy.Example:80", None, "http://comfy.example", 202),
            ("comfy.example", "https", "http://comfy.example", 403),
            ("comfy.example", None, "https://comfy.example", 403),
            ("comfy.example:8080", None, "http://comfy.example", 403),
        ):
            forwarded = f"\r\nX-Forwarded-Proto: {proto}" if proto else ""
            answer = await raw_request(
                daemon,
                f"POST /generate HTTP/1.1\r\nHost: {host}{forwarded}\r\nOrigin: {origin}"
                "\r\nContent-Type: application/json",
                FOX,
            )
            assert answer.status == status, (host, proto, origin, answer.body)


# ---------------------------------------------------------------- Host


async def test_allowed_hosts_refuse_other_host_names(tmp_path: Path) -> None:
    hosts = "127.0.0.1, comfy.example [::1]:8000"
    async with running_daemon(tmp_path, allowed_hosts=hosts) as daemon:
        assert (await daemon.request("GET", "/healthz")).status == 200  # Host: 127.0.0.1:port
        for host in ("comfy.example:8000", "COMFY.example", "[::1]:8000"):
            named = await raw_request(daemon, f"GET /healthz HTTP/1.1\r\nHost: {host}")
            assert named.status == 200, host
        # DNS rebinding: a hostile name that now resolves to us.
        for host in ("attacker.example", "127.0.0.1.attacker.example", "[::1]", "[::1]:80"):
            rebound = await raw_request(daemon, f"GET /healthz HTTP/1.1\r\nHost: {host}")
            assert rebound.status == 421, host
            assert rebound.json()["error"]["details"]["setting"] == "allowed_hosts"
        missing = await raw_request(daemon, "GET /healthz HTTP/1.0")
        assert missing.status == 421


async def test_a_host_without_a_port_is_at_its_scheme_s_default_port(tmp_path: Path) -> None:
    # A browser leaves the default port out of Host (http://comfy.example/ sends
    # "Host: comfy.example"), and nginx passes it on as it came ($http_host).
    async with running_daemon(tmp_path, allowed_hosts="comfy.example:80 tls.example:443") as daemon:
        for head in (
            "Host: comfy.example",
            "Host: comfy.example:80",
            "Host: tls.example\r\nX-Forwarded-Proto: https",
        ):
            answer = await raw_request(daemon, f"GET /healthz HTTP/1.1\r\n{head}")
            assert answer.status == 200, head
        for head in (
            "Host: comfy.example:8000",
            "Host: comfy.example\r\nX-Forwarded-Proto: https",
            "Host: tls.example",
        ):
            answer = await raw_request(daemon, f"GET /healthz HTTP/1.1\r\n{head}")
            assert answer.status == 421, head


async def test_without_allowed_hosts_any_host_is_served(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        answer = await raw_request(daemon, "GET /healthz HTTP/1.1\r\nHost: anything.example")
        assert answer.status == 200


# ---------------------------------------------------------------- CORS


async def test_a_listed_origin_gets_cors_preflight_and_headers(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, allowed_origins=f"{APP} https://other.example") as daemon:
        preflight = await http_request(
            "OPTIONS",
            daemon.url + "/generate",
            headers=[
                ("Origin", APP),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "content-type, authorization, idempotency-key"),
            ],
            timeout=10,
        )
        assert preflight.status == 204
        assert preflight.headers.get("access-control-allow-origin") == APP
        methods = preflight.headers.get("access-control-allow-methods") or ""
        assert {"POST", "DELETE", "GET"} <= {m.strip() for m in methods.split(",")}
        allowed = (preflight.headers.get("access-control-allow-headers") or "").lower()
        for header in ("content-type", "authorization", "idempotency-key", "last-event-id"):
            assert header in allowed
        assert int(preflight.headers.get("access-control-max-age") or 0) > 0
        assert "Origin" in preflight.headers.get_all("vary")

        created = await post(daemon, "/generate", JSON, ("Origin", APP))
        assert created.status == 202
        assert created.headers.get("access-control-allow-origin") == APP
        assert "Origin" in created.headers.get_all("vary")
        task_id = created.json()["taskId"]
        async with open_stream(
            "GET", f"{daemon.url}/progress/{task_id}", headers=[("Origin", APP)]
        ) as stream:
            assert stream.status == 200
            assert stream.headers.get("access-control-allow-origin") == APP
        cancel = await http_request(
            "DELETE", f"{daemon.url}/tasks/{task_id}", headers=[("Origin", APP)], timeout=10
        )
        assert cancel.headers.get("access-control-allow-origin") == APP

        unlisted = await http_request(
            "OPTIONS",
            daemon.url + "/generate",
            headers=[("Origin", "http://evil.example"), ("Access-Control-Request-Method", "POST")],
            timeout=10,
        )
        assert unlisted.status == 403
        assert unlisted.headers.get("access-control-allow-origin") is None


async def test_a_listed_origin_can_read_the_errors_the_http_layer_answers(tmp_path: Path) -> None:
    """A body over the limit is refused before any route (413, declared or read), and
    so is one too slow to arrive (408): a page of a listed origin must still be able
    to read why, so those answers carry its CORS headers too; others get none."""
    async with running_daemon(
        tmp_path, allowed_origins=APP, max_body_bytes=1024, body_read_timeout=0.5
    ) as daemon:
        too_big = b"x" * 2048
        declared = await post(daemon, "/generate", JSON, ("Origin", APP), body=too_big)
        head = (
            f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: {APP}\r\n{JSON[0]}: {JSON[1]}"
        )
        chunk = b"%x\r\n%b\r\n" % (len(too_big), too_big)
        chunked = await raw_exchange(
            daemon, f"{head}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunk
        )
        # Ten bytes announced, none sent: refused after body_read_timeout.
        slow = await raw_exchange(daemon, f"{head}\r\nContent-Length: 10\r\n\r\n".encode())
        other = await post(
            daemon, "/generate", JSON, ("Origin", "http://evil.example"), body=too_big
        )
    assert declared.status == 413
    assert declared.headers.get("access-control-allow-origin") == APP
    assert "Retry-After" in (declared.headers.get("access-control-expose-headers") or "")
    assert "Origin" in declared.headers.get_all("vary")
    assert (slow.status, slow.headers.get("access-control-allow-origin")) == (408, APP)
    assert chunked.status == 413, chunked.body
    assert chunked.headers.get("access-control-allow-origin") == APP
    assert other.status == 413
    assert other.headers.get("access-control-allow-origin") is None


# ---------------------------------------------------------------- API tokens


async def test_api_tokens_guard_post_delete_and_upload_but_not_reading(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, api_tokens=TOKEN, allowed_origins=APP) as daemon:
        for headers, error in (
            ((JSON,), None),
            ((JSON, ("Authorization", "Bearer wrong-token-of-some-length")), "invalid_token"),
            ((JSON, ("Authorization", f"Basic {TOKEN}")), None),
            ((JSON, ("Authorization", f"Bearer {TOKEN}x")), "invalid_token"),
        ):
            refused = await post(daemon, "/generate", *headers)
            assert refused.status == 401
            challenge = refused.headers.get("www-authenticate") or ""
            assert challenge.startswith("Bearer ")
            assert (f'error="{error}"' in challenge) == (error is not None)
        upload = await post(daemon, "/upload", ("Content-Type", "image/png"), body=b"\x89PNG")
        assert upload.status == 401
        assert daemon.app.registry.created == 0

        auth = ("Authorization", f"bearer {TOKEN}")
        created = await post(daemon, "/generate", JSON, auth)
        assert created.status == 202
        task_id = created.json()["taskId"]
        # Reading needs only the task's id.
        assert (await daemon.request("GET", f"/tasks/{task_id}")).status == 200
        events = payloads(await daemon.events(task_id))
        assert events[-1]["status"] == "completed"
        delete = f"{daemon.url}/tasks/{task_id}"
        assert (await http_request("DELETE", delete, timeout=10)).status == 401
        assert (await http_request("DELETE", delete, headers=[auth], timeout=10)).status == 200
        # A preflight carries no Authorization; the browser asks before sending it.
        preflight = await http_request(
            "OPTIONS",
            daemon.url + "/generate",
            headers=[("Origin", APP), ("Access-Control-Request-Method", "POST")],
            timeout=10,
        )
        assert preflight.status == 204
        # A 401 to a listed origin carries CORS headers, so the page can read it.
        from_app = await post(daemon, "/generate", JSON, ("Origin", APP))
        assert from_app.status == 401
        assert from_app.headers.get("access-control-allow-origin") == APP
        assert "WWW-Authenticate" in (from_app.headers.get("access-control-expose-headers") or "")
        assert await rejected(daemon, 401) == 7
        page = await daemon.request("GET", "/")
        assert TOKEN not in page.text()


# ---------------------------------------------------------------- Expect: 100-continue


async def first_answer(daemon: Daemon, head: str, length: int) -> tuple[str, str]:
    """Send a head with ``Expect: 100-continue`` and no body; the first answer's
    status line and the rest of its head (lower-case)."""
    stream = await trio.open_tcp_stream(daemon.bound.host, daemon.bound.port)
    async with stream:
        lines = f"{head}\r\nContent-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
        await stream.send_all(lines.encode("latin-1"))
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = await stream.receive_some(65536)
            assert chunk, received
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    return status_line.decode("latin-1"), rest.partition(b"\r\n\r\n")[0].decode().lower()


async def test_refusals_from_the_head_come_before_100_continue(tmp_path: Path) -> None:
    auth = f"Authorization: Bearer {TOKEN}"
    host = "Host: 127.0.0.1"
    async with running_daemon(
        tmp_path, api_tokens=TOKEN, allowed_origins=APP, allowed_hosts="127.0.0.1"
    ) as daemon:
        for head, status in (
            (f"POST /upload HTTP/1.1\r\n{host}\r\n{auth}\r\nContent-Type: text/plain", 415),
            (f"POST /generate HTTP/1.1\r\n{host}\r\n{auth}\r\nContent-Type: text/plain", 415),
            (f"POST /upload HTTP/1.1\r\n{host}\r\nContent-Type: image/png", 401),
            (f"POST /generate HTTP/1.1\r\n{host}\r\nOrigin: http://evil.example", 403),
            (f"POST /generate HTTP/1.1\r\nHost: rebound.example\r\n{auth}", 421),
        ):
            status_line, rest = await first_answer(daemon, head, 1000)
            assert status_line.startswith(f"HTTP/1.1 {status} "), (head, status_line)
            assert "connection: close" in rest
        # A request that may succeed gets its 100 Continue.
        ok = f"POST /upload HTTP/1.1\r\n{host}\r\n{auth}\r\nContent-Type: image/png"
        assert (await first_answer(daemon, ok, 1000))[0].startswith("HTTP/1.1 100 ")
        # The refusals are counted as ever.
        assert await rejected(daemon, 401) == 1
        assert await rejected(daemon, 403) == 1
        assert await rejected(daemon, 421) == 1
        assert daemon.app.registry.created == 0


# ---------------------------------------------------------------- settings


def test_api_tokens_are_refused_on_the_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be set on the command line"):
        load(config_file=None, environ={}, flags={"api_tokens": TOKEN})


def test_api_tokens_come_from_the_environment_and_a_file(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# the phone\n{'b' * 20}\n\n{'c' * 20}\n")
    config = load(
        config_file=None,
        environ={"COMFY_PROGRESS_API_TOKENS": TOKEN},
        flags={"api_tokens_file": str(token_file)},
    )
    assert config.api_tokens.split() == [TOKEN, "b" * 20, "c" * 20]
    printed = render_toml(config)
    assert TOKEN not in printed
    assert "b" * 20 not in printed
    assert "api_tokens is set (not shown)" in printed


@pytest.mark.parametrize("token", ["short", "has space in it, far too", "é" * 20])
def test_weak_or_malformed_tokens_are_refused_without_showing_them(token: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(config_file=None, environ={"COMFY_PROGRESS_API_TOKENS": token}, flags={})
    assert token not in str(caught.value)


def test_unreadable_token_file_and_bad_origins_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="api_tokens_file"):
        load(config_file=None, environ={}, flags={"api_tokens_file": str(tmp_path / "none")})
    for origin in ("app.example", "ftp://app.example", "https://app.example/path"):
        with pytest.raises(ConfigError, match="allowed_origins"):
            load(config_file=None, environ={}, flags={"allowed_origins": origin})
    for host in ("http://comfy.example", "comfy.example:99999", "user@comfy.example"):
        with pytest.raises(ConfigError, match="allowed_hosts"):
            load(config_file=None, environ={}, flags={"allowed_hosts": host})


# ---------------------------------------------------------------- the comparison


def test_origins_and_hosts_are_compared_scheme_host_and_port() -> None:
    assert parse_origin("HTTPS://Example.COM") == ("https", "example.com", 443)
    assert parse_origin("http://[::1]:8000") == ("http", "::1", 8000)
    for bad in ("null", "example.com", "file://x", "http://a/b", "http://a:99999", "http://u@a"):
        assert parse_origin(bad) is None, bad
    assert split_host("Example.com:8080") == ("example.com", 8080)
    assert split_host("[::1]") == ("::1", None)
    for bad in ("", "a b", "a:b", "a:123456", "a/b", "u@a"):
        assert split_host(bad) is None, bad

    def request(*headers: tuple[str, str]) -> Request:
        return Request("GET", "/", "/", {}, Headers(headers), b"", "127.0.0.1:1")

    assert own_origin(request(("host", "a.example"))) == ("http", "a.example", 80)
    proxied = request(("host", "a.example"), ("x-forwarded-proto", "https"))
    assert own_origin(proxied) == ("https", "a.example", 443)
    assert own_origin(request(("host", "a:1"), ("x-forwarded-proto", "gopher"))) == ("http", "a", 1)
    assert own_origin(request()) is None
