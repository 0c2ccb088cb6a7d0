"""Router: pattern matching, decoding, 404/405/HEAD, body limits (no sockets)."""

from __future__ import annotations

import json

import pytest
import trio

from daemon.http import Handler, Headers, Request, Response, Router
from daemon.http.target import BadTarget, parse_query, path_segments, split_target


def request(method: str, target: str) -> Request:
    return Request(
        method=method,
        target=target,
        path=split_target(target)[0],
        query={},
        headers=Headers(),
        body=b"",
        peer="test",
    )


def tagging(tag: str) -> Handler:
    async def handler(req: Request) -> Response:
        await trio.lowlevel.checkpoint()
        body = json.dumps({"tag": tag, "params": dict(req.path_params), "method": req.method})
        return Response(200, [], body.encode())

    return handler


def router() -> Router:
    r = Router()
    r.add("GET", "/", tagging("root"))
    r.add("GET", "/tasks/stats", tagging("stats"))
    r.add("GET", "/tasks/{task_id}", tagging("get-task"))
    r.add("DELETE", "/tasks/{task_id}", tagging("delete-task"))
    r.add("POST", "/generate", tagging("generate"), max_body=64 * 1024)
    r.add("GET", "/files/{path...}", tagging("files"))
    r.add("HEAD", "/only-head", tagging("head"))
    r.add("GET", "/a/{x}/b/{y}", tagging("two"))
    return r


async def call(r: Router, method: str, target: str) -> tuple[int, dict[str, object], Response]:
    response = await r(request(method, target))
    assert isinstance(response, Response)
    return response.status, json.loads(response.body), response


@pytest.mark.parametrize(
    ("method", "target", "tag", "params"),
    [
        ("GET", "/", "root", {}),
        ("GET", "/tasks/abc", "get-task", {"task_id": "abc"}),
        ("GET", "/tasks/stats", "stats", {}),  # first added wins
        ("DELETE", "/tasks/abc", "delete-task", {"task_id": "abc"}),
        ("GET", "/tasks/a%20b", "get-task", {"task_id": "a b"}),
        ("GET", "/tasks/a%2Fb", "get-task", {"task_id": "a/b"}),  # %2F stays in its segment
        ("GET", "/tasks/x?y=1", "get-task", {"task_id": "x"}),
        ("GET", "/files/", "files", {"path": ""}),
        ("GET", "/files/js/main.mjs", "files", {"path": "js/main.mjs"}),
        ("GET", "/a/1/b/2", "two", {"x": "1", "y": "2"}),
        ("HEAD", "/tasks/abc", "get-task", {"task_id": "abc"}),  # HEAD falls back to GET
        ("HEAD", "/only-head", "head", {}),
    ],
)
async def test_routes_match(method: str, target: str, tag: str, params: dict[str, str]) -> None:
    status, body, _ = await call(router(), method, target)
    assert status == 200
    assert body == {"tag": tag, "params": params, "method": method}


@pytest.mark.parametrize(
    "target",
    ["/nope", "/tasks", "/tasks/", "/tasks/abc/extra", "/a/1/b", "/a//b/2", "//"],
)
async def test_unknown_paths_are_404(target: str) -> None:
    status, body, _ = await call(router(), "GET", target)
    assert status == 404
    assert body["error"] == {"message": "not found", "details": {"path": split_target(target)[0]}}


async def test_wrong_method_is_405_with_allow() -> None:
    status, body, response = await call(router(), "PUT", "/tasks/abc")
    assert status == 405
    assert dict(response.headers)["allow"] == "DELETE, GET, HEAD"
    assert body["error"] == {
        "message": "method not allowed",
        "details": {"allowed": ["DELETE", "GET", "HEAD"]},
    }


async def test_get_on_a_head_only_route_is_405() -> None:
    status, _, response = await call(router(), "GET", "/only-head")
    assert status == 405
    assert dict(response.headers)["allow"] == "HEAD"


async def test_lookups_are_remembered_until_a_route_is_added() -> None:
    r = router()
    for _ in range(2):  # the second answer comes from what the first lookup found
        status, data, _ = await call(r, "GET", "/tasks/abc")
        assert (status, data["params"]) == (200, {"task_id": "abc"})
    assert (await call(r, "GET", "/late"))[0] == 404
    r.add("GET", "/late", tagging("late"))
    status, data, _ = await call(r, "GET", "/late")
    assert (status, data["tag"]) == (200, "late")
    for n in range(300):  # more distinct targets than are kept: still each its own answer
        _, data, _ = await call(r, "GET", f"/tasks/t{n}")
        assert data["params"] == {"task_id": f"t{n}"}


def test_body_limits_come_from_the_matching_route() -> None:
    r = router()
    assert r.body_limit_for("POST", "/generate") == 64 * 1024
    assert r.body_limit_for("POST", "/generate?x=1") == 64 * 1024
    assert r.body_limit_for("GET", "/tasks/abc") is None
    assert r.body_limit_for("POST", "/nope") is None
    assert r.body_limit_for("PUT", "/generate") is None


@pytest.mark.parametrize(
    "pattern", ["no-slash", "/a/{x}/{x}", "/{rest...}/tail", "/a{b}", "/{1bad}", "/{x"]
)
def test_bad_patterns_are_refused(pattern: str) -> None:
    async def handler(req: Request) -> Response:
        return Response(200)

    with pytest.raises(ValueError, match="pattern"):
        Router().add("GET", pattern, handler)


def test_negative_max_body_is_refused() -> None:
    async def handler(req: Request) -> Response:
        return Response(200)

    with pytest.raises(ValueError, match="max_body"):
        Router().add("POST", "/x", handler, max_body=-1)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/a/b?c=d", ("/a/b", "c=d")),
        ("/a", ("/a", "")),
        ("http://host:8/x/y?z", ("/x/y", "z")),
        ("http://host", ("/", "")),
        ("*", ("*", "")),
    ],
)
def test_split_target(target: str, expected: tuple[str, str]) -> None:
    assert split_target(target) == expected


def test_path_segments_decode_each_segment() -> None:
    assert path_segments("/") == [""]
    assert path_segments("/a/b%2Fc/") == ["a", "b/c", ""]
    assert path_segments("/caf%C3%A9") == ["café"]
    with pytest.raises(BadTarget):
        path_segments("/%FF")


def test_query_keeps_the_first_value_and_blanks() -> None:
    assert parse_query("a=1&a=2&b=&c=x%20y") == {"a": "1", "b": "", "c": "x y"}


def test_headers_are_case_insensitive_and_multi_valued() -> None:
    headers = Headers(
        [("Set-Cookie", "a=1"), ("content-type", "text/plain"), ("set-cookie", "b=2")]
    )
    assert headers.get("SET-COOKIE") == "a=1"
    assert headers.get_all("set-cookie") == ["a=1", "b=2"]
    assert headers.get("missing") is None
    assert headers.get("missing", "dflt") == "dflt"
    assert "Content-Type" in headers
    assert "x" not in headers
    assert len(headers) == 3
    assert list(headers)[1] == ("content-type", "text/plain")
    assert headers == Headers(
        [("set-cookie", "a=1"), ("Content-Type", "text/plain"), ("SET-COOKIE", "b=2")]
    )


async def test_observer_hears_patterns_and_statuses() -> None:
    heard: list[tuple[str, str | None, int]] = []
    r = Router(observer=lambda method, pattern, status: heard.append((method, pattern, status)))
    r.add("GET", "/tasks/{task_id}", tagging("get-task"))

    async def crash(req: Request) -> Response:
        await trio.lowlevel.checkpoint()
        raise RuntimeError("boom")

    r.add("POST", "/crash", crash)
    await r(request("GET", "/tasks/abc123"))
    await r(request("HEAD", "/tasks/abc123"))
    await r(request("DELETE", "/tasks/abc123"))
    await r(request("GET", "/nowhere"))
    with pytest.raises(RuntimeError, match="boom"):
        await r(request("POST", "/crash"))
    assert heard == [
        ("GET", "/tasks/{task_id}", 200),
        ("HEAD", "/tasks/{task_id}", 200),
        ("DELETE", None, 405),
        ("GET", None, 404),
        ("POST", "/crash", 500),
    ]


def test_head_checks_answer_before_the_body_and_are_observed() -> None:
    heard: list[tuple[str, str | None, int]] = []
    r = Router(observer=lambda method, pattern, status: heard.append((method, pattern, status)))
    seen: list[str] = []

    def refuse_all(req: Request) -> Response:
        seen.append(req.path_params["name"])
        return Response(415, [])

    r.add("POST", "/typed/{name}", tagging("typed"), check_head=refuse_all)
    r.add("POST", "/plain", tagging("plain"))
    refusal = r.refuse_before_body(request("POST", "/typed/a"))
    assert refusal is not None
    assert refusal.status == 415
    assert seen == ["a"]  # with the route's parameters
    assert r.refuse_before_body(request("POST", "/plain")) is None
    assert r.refuse_before_body(request("GET", "/typed/a")) is None  # 405 is not its to say
    assert r.refuse_before_body(request("POST", "/nowhere")) is None
    assert heard == [("POST", "/typed/{name}", 415)]
