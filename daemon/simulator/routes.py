"""ComfyUI's HTTP API (FACTS §5) plus the simulator's /sim control endpoints.

Every handler takes an HttpRequest and returns an HttpResponse, or a Takeover
for the WebSocket upgrade; nothing here knows about sockets or h11. Every
ComfyUI route also answers under /api, and a request whose Origin host differs
from its Host gets 403 first, WebSocket upgrades included.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import mimetypes
import platform
import posixpath
import sys
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Protocol
from urllib.parse import urlparse, urlsplit

import trio

from daemon.simulator.config import SimulatorConfig
from daemon.simulator.control import ControlError
from daemon.simulator.engine import SimulatorEngine
from daemon.simulator.files import FOLDER_TYPES, FileStore, PathEscape, annotated_filepath
from daemon.simulator.httptypes import (
    INTERNAL_ERROR,
    HttpRequest,
    HttpResponse,
    Takeover,
    empty_response,
    json_response,
    text_response,
)
from daemon.simulator.multipart import FilePart, parse_form
from daemon.simulator.nodes import NodeDef
from daemon.simulator.validation import PromptCrash
from daemon.simulator.websocket import Hub

logger = logging.getLogger(__name__)

Result = HttpResponse | Takeover
Handler = Callable[[HttpRequest, dict[str, str]], Result]

CONTROL_PREFIX = "/sim/"
# Browsers must download these rather than render them (ComfyUI's /view rule).
_FORCED_DOWNLOAD = {
    "text/html",
    "text/html-sandboxed",
    "application/xhtml+xml",
    "text/javascript",
    "text/css",
}


class ControlSurface(Protocol):
    """What /sim/control and /sim/state drive (the ComfySimulator)."""

    def apply_control(self, body: Any) -> None:
        """Apply a control request; raises ControlError for a bad one."""

    def state(self) -> dict[str, Any]:
        """The knobs and a summary of the server state."""


class BadJson(Exception):
    """A body that aiohttp's request.json() would fail on."""


def _json_body(request: HttpRequest) -> Any:
    try:
        return json.loads(request.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadJson() from None


def _is_loopback(host: str | None) -> bool:
    # ComfyUI resolves the name; we avoid DNS and accept localhost names and literals.
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def origin_forbidden(request: HttpRequest) -> bool:
    """ComfyUI's origin_only_middleware: a loopback Host with a foreign Origin."""
    host = request.header("host")
    origin = request.header("origin")
    if host is None or origin is None:
        return False
    host_domain: str | None = host.lower()
    parsed = urlparse(origin)
    origin_domain: str | None = parsed.netloc.lower()
    host_parsed = urlsplit("//" + host.lower())
    try:
        origin_port, host_port = parsed.port, host_parsed.port
    except ValueError:
        return False
    loopback = _is_loopback(host_parsed.hostname)
    if origin_port is None:  # no port in Origin: compare host names only
        host_domain = host_parsed.hostname
    if host_port is None:
        origin_domain = parsed.hostname
    if loopback and host_domain and origin_domain:
        return host_domain != origin_domain
    return False


class SimulatorRoutes:
    """Dispatches requests to ComfyUI's routes, each also mounted under /api."""

    def __init__(
        self,
        *,
        engine: SimulatorEngine,
        hub: Hub,
        files: FileStore,
        catalogue: Mapping[str, NodeDef],
        config: SimulatorConfig,
        control: ControlSurface,
    ) -> None:
        self._engine = engine
        self._hub = hub
        self._files = files
        self._catalogue = catalogue
        self._config = config
        self._control = control
        self._routes: list[tuple[str, str, Handler]] = [
            ("GET", "/ws", self._websocket),
            ("GET", "/prompt", self._get_prompt),
            ("POST", "/prompt", self._post_prompt),
            ("GET", "/queue", self._get_queue),
            ("POST", "/queue", self._post_queue),
            ("POST", "/interrupt", self._post_interrupt),
            ("GET", "/history", self._get_history),
            ("POST", "/history", self._post_history),
            ("GET", "/history/{prompt_id}", self._get_history_item),
            ("GET", "/view", self._view),
            ("POST", "/upload/image", self._upload_image),
            ("GET", "/system_stats", self._system_stats),
            ("GET", "/object_info", self._object_info),
            ("GET", "/object_info/{node_class}", self._object_info_node),
            ("GET", "/features", self._get_features),
        ]
        self._control_routes: list[tuple[str, str, Handler]] = [
            ("GET", "/sim/state", self._sim_state),
            ("POST", "/sim/control", self._sim_control),
            ("GET", "/sim/history/{prompt_id}/wait", self._sim_wait_history),
        ]

    @staticmethod
    def is_control_path(path: str) -> bool:
        """The /sim/ endpoints stay reachable while connections are rejected."""
        return path.startswith(CONTROL_PREFIX)

    async def handle(self, request: HttpRequest) -> Result:
        """Answer one request (never raises: a crash becomes aiohttp's bare 500)."""
        try:
            return self._dispatch(request)
        except (BadJson, PromptCrash):
            return INTERNAL_ERROR
        except Exception:
            logger.exception("simulated handler crashed on %s %s", request.method, request.path)
            return INTERNAL_ERROR

    def _dispatch(self, request: HttpRequest) -> Result:
        if self.is_control_path(request.path):
            return self._route(request, request.path, self._control_routes)
        if origin_forbidden(request):
            return empty_response(403)
        if request.method == "OPTIONS":
            return empty_response(200)
        path = request.path
        if path.startswith("/api/"):
            path = path[len("/api") :]
        return self._route(request, path, self._routes)

    @staticmethod
    def _route(request: HttpRequest, path: str, routes: list[tuple[str, str, Handler]]) -> Result:
        allowed: list[str] = []
        for method, pattern, handler in routes:
            params = _match(pattern, path)
            if params is None:
                continue
            if method == request.method or (method == "GET" and request.method == "HEAD"):
                return handler(request, params)
            allowed.append(method)
        if allowed:
            allow = ",".join(sorted({*allowed, *(["HEAD"] if "GET" in allowed else [])}))
            return text_response(405, "405: Method Not Allowed", (("Allow", allow),))
        return text_response(404, "404: Not Found")

    # ------------------------------------------------------------ WebSocket

    def _websocket(self, request: HttpRequest, params: dict[str, str]) -> Result:
        if (request.header("upgrade") or "").lower() != "websocket":
            return text_response(400, "400: Bad Request")
        client_id = request.query.get("clientId", "")
        return Takeover(partial(self._hub.run_websocket, client_id=client_id))

    # ------------------------------------------------------------ prompts and queue

    def _get_prompt(self, request: HttpRequest, params: dict[str, str]) -> Result:
        return json_response(self._engine.queue_info())

    def _post_prompt(self, request: HttpRequest, params: dict[str, str]) -> Result:
        status, body = self._engine.submit(_json_body(request))
        return json_response(body, status)

    def _get_queue(self, request: HttpRequest, params: dict[str, str]) -> Result:
        queue = self._engine.queue
        return json_response(
            {
                "queue_running": [item.as_json() for item in queue.running()],
                "queue_pending": [item.as_json() for item in queue.pending()],
            }
        )

    def _post_queue(self, request: HttpRequest, params: dict[str, str]) -> Result:
        data = _json_body(request)
        # `in` then [], not .get(): a JSON array body must behave as in ComfyUI.
        if "clear" in data and data["clear"]:  # noqa: RUF019
            self._engine.queue.wipe()
        if "delete" in data:
            self._engine.delete_pending(data["delete"])
        return empty_response()

    def _post_interrupt(self, request: HttpRequest, params: dict[str, str]) -> Result:
        try:
            data = _json_body(request)
        except BadJson:
            data = {}  # no body, or not JSON: a global interrupt
        self._engine.interrupt(data.get("prompt_id"))
        return empty_response()

    # ------------------------------------------------------------ history

    def _get_history(self, request: HttpRequest, params: dict[str, str]) -> Result:
        raw_max = request.query.get("max_items")
        raw_offset = request.query.get("offset")
        max_items = int(raw_max) if raw_max is not None else None
        offset = int(raw_offset) if raw_offset is not None else -1
        return json_response(self._engine.history.list(max_items, offset))

    def _get_history_item(self, request: HttpRequest, params: dict[str, str]) -> Result:
        return json_response(self._engine.history.get(params["prompt_id"]))

    def _post_history(self, request: HttpRequest, params: dict[str, str]) -> Result:
        data = _json_body(request)
        if "clear" in data and data["clear"]:  # noqa: RUF019 - see _post_queue
            self._engine.history.clear()
        if "delete" in data:
            for prompt_id in data["delete"]:
                self._engine.history.delete(prompt_id)
        return empty_response()

    # ------------------------------------------------------------ files

    def _view(self, request: HttpRequest, params: dict[str, str]) -> Result:
        # Gaps: `preview=` (webp/jpeg re-encode) and `channel=` are ignored.
        if "filename" not in request.query:
            return empty_response(404)
        filename, folder = annotated_filepath(request.query["filename"])
        if not filename or filename[0] == "/" or ".." in filename:
            return empty_response(400)
        if folder is None:
            folder = request.query.get("type", "output")
        if folder not in FOLDER_TYPES:
            return empty_response(400)
        subfolder = request.query.get("subfolder", "")
        try:
            self._files.check_inside(subfolder)
        except PathEscape:
            return empty_response(403)
        filename = posixpath.basename(filename)
        data = self._files.get(folder, subfolder, filename)
        if data is None:
            return empty_response(404)
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if content_type in _FORCED_DOWNLOAD:
            content_type = "application/octet-stream"
        headers = (
            ("Content-Type", content_type),
            ("Content-Disposition", f'filename="{filename}"'),
        )
        return HttpResponse(200, headers, data)

    def _upload_image(self, request: HttpRequest, params: dict[str, str]) -> Result:
        if len(request.body) > self._config.max_upload_size:
            return text_response(413, "413: Request Entity Too Large")
        form = parse_form(request.header("content-type"), request.body)
        image = form.get("image")
        if not isinstance(image, FilePart):
            if isinstance(image, str):
                raise TypeError("image is not a file")  # aiohttp: str has no .file -> 500
            return empty_response(400)
        if not image.filename:
            return empty_response(400)
        raw_type = form.get("type")
        if raw_type is not None and raw_type not in FOLDER_TYPES:
            raise ValueError(f"upload type {raw_type!r}")  # ComfyUI: UnboundLocalError -> 500
        folder = raw_type if isinstance(raw_type, str) else "input"
        subfolder = form.get("subfolder", "")
        subfolder = subfolder if isinstance(subfolder, str) else ""
        overwrite = form.get("overwrite") in ("true", "1")
        try:
            self._files.check_inside(posixpath.normpath(subfolder or "."), image.filename)
        except PathEscape:
            return empty_response(400)
        name = self._files.upload(
            folder, subfolder, image.filename, image.data, overwrite=overwrite
        )
        return json_response({"name": name, "subfolder": subfolder, "type": folder})

    # ------------------------------------------------------------ server info

    def _system_stats(self, request: HttpRequest, params: dict[str, str]) -> Result:
        ram = 16 * 1024**3
        return json_response(
            {
                "system": {
                    "os": "posix",
                    "ram_total": ram,
                    "ram_free": ram // 2,
                    "comfyui_version": self._config.comfyui_version,
                    "required_frontend_version": "1.27.10",
                    "installed_templates_version": "0.1.95",
                    "required_templates_version": "0.1.95",
                    "python_version": sys.version,
                    "pytorch_version": "simulated",
                    "embedded_python": False,
                    "argv": ["comfy-progress", "simulate-comfy"],
                },
                "devices": [
                    {
                        "name": f"cpu (simulated on {platform.machine() or 'unknown'})",
                        "type": "cpu",
                        "index": None,
                        "vram_total": ram,
                        "vram_free": ram // 2,
                        "torch_vram_total": ram,
                        "torch_vram_free": ram // 2,
                    }
                ],
            }
        )

    def _object_info(self, request: HttpRequest, params: dict[str, str]) -> Result:
        env = self._engine.env
        return json_response({name: d.info(env) for name, d in self._catalogue.items()})

    def _object_info_node(self, request: HttpRequest, params: dict[str, str]) -> Result:
        node_def = self._catalogue.get(params["node_class"])
        if node_def is None:
            return json_response({})
        return json_response({node_def.name: node_def.info(self._engine.env)})

    def _get_features(self, request: HttpRequest, params: dict[str, str]) -> Result:
        return json_response(server_features(self._config))

    # ------------------------------------------------------------ /sim control

    def _sim_state(self, request: HttpRequest, params: dict[str, str]) -> Result:
        return json_response(self._control.state())

    def _sim_control(self, request: HttpRequest, params: dict[str, str]) -> Result:
        try:
            self._control.apply_control(_json_body(request))
        except BadJson:
            return json_response({"error": "the body must be JSON"}, 400)
        except ControlError as exc:
            return json_response({"error": str(exc)}, 400)
        return json_response(self._control.state())

    def _sim_wait_history(self, request: HttpRequest, params: dict[str, str]) -> Result:
        """Answer once the prompt has finished, so a test in another process waits for
        that moment instead of polling /history."""
        prompt_id = params["prompt_id"]
        history = self._engine.history

        async def answer_when_finished(stream: trio.abc.Stream, _request: bytes) -> None:
            await history.wait_for(prompt_id)
            await stream.send_all(FINISHED_REPLY)

        return Takeover(answer_when_finished)


# A bare answer: the connection was taken over, so h11 is no longer in charge of it.
FINISHED_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def server_features(config: SimulatorConfig) -> dict[str, Any]:
    """GET /features, and the reply to a client's feature_flags message."""
    return {"supports_preview_metadata": True, "max_upload_size": config.max_upload_size}


def _match(pattern: str, path: str) -> dict[str, str] | None:
    pattern_parts = pattern.split("/")
    path_parts = path.split("/")
    if len(pattern_parts) != len(path_parts):
        return None
    params: dict[str, str] = {}
    for want, got in zip(pattern_parts, path_parts, strict=True):
        if want.startswith("{") and want.endswith("}"):
            if not got:
                return None
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params
