"""One frozen Config, built from a TOML file, then environment variables, then flags.

Each layer overrides the one before. Every setting is a field below with its
default and a one-line help text; `comfy-progress serve --print-config` prints
the effective values and the README's configuration reference lists them.
Unknown keys and bad values are errors at start-up (`ConfigError`), naming
where the value came from.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from daemon.api.access import parse_origin, split_host
from daemon.api.clients import parse_networks

ENV_PREFIX: Final = "COMFY_PROGRESS_"
# COMFY_PROGRESS_API_TOKEN: daemon.terminal.client's TOKEN_VARIABLE.
CLIENT_TOKEN_KEY: Final = "api_token"
REPO_ROOT: Final = Path(__file__).resolve().parent.parent


class ConfigError(Exception):
    """A configuration value is unknown or invalid; the message says where it came from."""


def _setting(default: Any, help: str, **checks: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **checks})


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    # -- where to listen and what to talk to
    listen: str = _setting(
        "127.0.0.1:8000",
        "HOST:PORT the HTTP server binds, or unix:/absolute/path for a Unix socket"
        " (ignored under socket activation)",
    )
    listen_mode: str = _setting(
        "0666",
        "with listen = unix:...: the socket file's permissions, octal (0660 and a group"
        " shared with the proxy is tighter)",
    )
    comfy_url: str = _setting(
        "", "base URL of ComfyUI, e.g. http://127.0.0.1:8188 (empty: see simulate)"
    )
    comfy_urls: tuple[str, ...] = _setting(
        (),
        "more ComfyUI base URLs, one backend each (a TOML list, or space- or comma-separated)",
    )
    simulate: bool = _setting(False, "run the embedded ComfyUI simulator and use it as the backend")
    simulators: int = _setting(
        1, "with simulate: how many embedded simulators (backends); --simulate N sets it", min=1
    )
    simulator_step_time: float = _setting(0.15, "simulator: seconds per sampler step", min=0.0)
    simulator_previews: bool = _setting(
        True, "simulator: the sampler sends a JPEG preview and a progress text per step"
    )
    data_dir: Path = _setting(
        Path("data"), "directory for images, the task journal and the ComfyUI client ids"
    )
    public_dir: Path = _setting(REPO_ROOT / "public", "directory of the browser client served at /")
    node_modules_dir: Path = _setting(
        REPO_ROOT / "node_modules", "npm packages served at /vendor/ (Preact, htm)"
    )
    workflows_dir: str = _setting(
        "", "directory of your own workflow files (*.json), added to the shipped ones (empty: none)"
    )
    default_checkpoint: str = _setting(
        "v1-5-pruned-emaonly.safetensors",
        "checkpoint a workflow uses when neither its file nor the request names one",
    )
    log_level: str = _setting(
        "info", "debug | info | warning | error", choices=("debug", "info", "warning", "error")
    )
    # -- tasks and streams
    heartbeat_interval: float = _setting(
        30.0, "seconds between SSE `: heartbeat` comments", min=0.01
    )
    task_retention: float = _setting(
        300.0, "seconds a finished task is still served before it is forgotten", min=0.0
    )
    backend_wait_timeout: float = _setting(
        120.0,
        "seconds a task waits while no ComfyUI (with redis_url: no live worker) can run it "
        "before it fails",
        min=0.0,
    )
    sse_retry_ms: int = _setting(2000, "the `retry:` hint sent to SSE clients (ms)", min=0)
    max_tasks: int = _setting(
        10_000,
        "tasks kept at once (running + finished); beyond it /generate answers 503"
        " (not with redis_url: there max_queued_tasks bounds the service)",
        min=1,
    )
    preview_max_rate: float = _setting(
        4.0, "preview announcements per task per second (the newest preview wins)", min=0.01
    )
    preview_max_task_bytes: int = _setting(
        4 * 1024 * 1024,
        "largest preview image kept for a task (bytes; bigger ones are dropped)",
        min=1,
    )
    preview_max_total_bytes: int = _setting(
        64 * 1024 * 1024, "memory for all tasks' previews (bytes; the stalest are evicted)", min=1
    )
    max_queued_tasks: int = _setting(
        1000,
        "unfinished tasks (waiting or running) at once; beyond it /generate answers 429"
        " (with redis_url: the whole service's)",
        min=1,
    )
    max_queued_tasks_per_client: int = _setting(
        0,
        "unfinished tasks per client (its API token with api_tokens set, else its address);"
        " beyond it 429 (0: no limit; with redis_url: over the whole service)",
        min=0,
    )
    trusted_proxies: str = _setting(
        "",
        "comma-separated proxy addresses/networks (and `unix`: any peer on the Unix socket)"
        " whose X-Forwarded-For/X-Real-IP name the client",
    )
    # -- ComfyUI connection
    comfy_http_timeout: float = _setting(30.0, "seconds per HTTP request to ComfyUI", min=0.01)
    comfy_connect_timeout: float = _setting(10.0, "seconds to open ComfyUI's WebSocket", min=0.01)
    comfy_silence_timeout: float = _setting(
        30.0,
        "seconds without a frame while a task runs before the socket is probed and replaced",
        min=0.01,
    )
    backend_max_pending: int = _setting(
        2,
        "a backend takes a task only while its ComfyUI queue (running + pending, anyone's) "
        "holds fewer prompts than this",
        min=1,
    )
    backend_lost_after: float = _setting(
        60.0,
        "seconds a backend may be away while it runs a task before the task is resubmitted",
        min=0.0,
    )
    resubmit_lost: bool = _setting(
        True,
        "resubmit a task its backend lost (restart, or away past backend_lost_after); "
        "false: it ends with code `lost`",
    )
    reconnect_initial_delay: float = _setting(
        0.5, "first reconnect delay (s); doubles per failure, with jitter", min=0.0
    )
    reconnect_max_delay: float = _setting(30.0, "cap on the reconnect delay (s)", min=0.0)
    queue_poll_interval: float = _setting(
        1.0,
        "minimum seconds between GET /queue reads for queue positions (with redis_url: how"
        " often a front updates the places of the tasks no worker took yet)",
        min=0.01,
    )
    max_image_bytes: int = _setting(
        64 * 1024 * 1024, "largest image fetched from ComfyUI or served at /image (bytes)", min=1
    )
    image_retention: float = _setting(
        7 * 24 * 3600.0,
        "seconds an image is kept (0: no age limit); images of tasks still held are kept",
        min=0.0,
    )
    max_image_store_bytes: int = _setting(
        2 * 1024**3,
        "the image store's size budget; beyond it the oldest images go (0: no limit)",
        min=0,
    )
    # -- HTTP server limits
    max_body_bytes: int = _setting(1024 * 1024, "largest request body (bytes) -> 413", min=1)
    max_upload_bytes: int = _setting(
        20 * 1024 * 1024, "largest POST /upload image (bytes) -> 413", min=1
    )
    max_header_bytes: int = _setting(16 * 1024, "largest request head (bytes) -> 431", min=1024)
    header_read_timeout: float = _setting(
        10.0, "seconds to receive a request head -> 408", min=0.01
    )
    body_read_timeout: float = _setting(30.0, "seconds to receive a request body -> 408", min=0.01)
    keep_alive_timeout: float = _setting(
        5.0, "seconds an idle keep-alive connection stays open", min=0.01
    )
    write_timeout: float = _setting(
        10.0, "seconds one write to a client may take (slow SSE readers are dropped)", min=0.01
    )
    max_connections: int = _setting(
        10_000, "open client connections at once; beyond it new ones get 503", min=1
    )
    shutdown_grace: float = _setting(
        10.0, "seconds open requests get to finish on SIGTERM", min=0.0
    )
    # -- several daemons sharing state (daemon/shared/)
    redis_url: str = _setting(
        "",
        "redis://HOST:PORT/DB shared by several daemons (empty: one process, in-memory state"
        " and the SQLite journal)",
    )
    role: str = _setting(
        "both",
        "with redis_url: front (HTTP only), worker (takes work only) or both",
        choices=("front", "worker", "both"),
    )
    redis_prefix: str = _setting(
        "comfy-progress", "with redis_url: the prefix of every Redis key this service uses"
    )
    lease_timeout: float = _setting(
        15.0,
        "with redis_url: seconds a worker may stay silent before another claims its tasks",
        min=0.5,
    )
    # -- who may call (daemon/api/access.py)
    allowed_origins: str = _setting(
        "",
        "origins (scheme://host[:port]) whose pages may call the API, besides the daemon's own;"
        " space- or comma-separated",
    )
    allowed_hosts: str = _setting(
        "", "Host header names (or name:port) the daemon answers to (empty: any) -> 421"
    )
    api_tokens: str = _setting(
        "",
        "bearer tokens POST and DELETE need, space- or comma-separated (empty: none);"
        " from the environment or the config file, never a flag",
        secret=True,
    )
    api_tokens_file: str = _setting(
        "", "file with one API token per line (# comments), added to api_tokens"
    )

    @property
    def backend_urls(self) -> tuple[str, ...]:
        """Every configured ComfyUI, in order, each once (comfy_url first)."""
        urls = (self.comfy_url, *self.comfy_urls) if self.comfy_url else self.comfy_urls
        return tuple(dict.fromkeys(u.rstrip("/") for u in urls if u))

    @property
    def shared(self) -> bool:
        """Several daemons share their tasks through Redis."""
        return bool(self.redis_url)

    @property
    def listen_host(self) -> str:
        return split_host_port(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return split_host_port(self.listen)[1]

    @property
    def listen_unix_path(self) -> Path | None:
        """The Unix socket's path with listen = unix:/path, else None (TCP)."""
        return unix_socket_path(self.listen)

    @property
    def listen_socket_mode(self) -> int:
        return socket_mode(self.listen_mode)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


FIELDS: Final = {f.name: f for f in dataclasses.fields(Config)}
FLOAT_MAX: Final = 1e9  # the largest number a duration (or rate) setting takes


def split_host_port(value: str) -> tuple[str, int]:
    """'127.0.0.1:8000' -> ('127.0.0.1', 8000); '[::1]:80' works too."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"listen address {value!r} is not HOST:PORT")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ConfigError(f"listen port {number} is out of range")
    return host.strip("[]"), number


UNIX_PREFIX: Final = "unix:"
# sun_path holds 108 bytes, the terminating NUL included.
MAX_UNIX_PATH_BYTES: Final = 107


def unix_socket_path(value: str) -> Path | None:
    """'unix:/run/x.sock' -> Path('/run/x.sock'); None for HOST:PORT."""
    if not value.startswith(UNIX_PREFIX):
        return None
    path = value[len(UNIX_PREFIX) :]
    if not path:
        raise ConfigError(
            f"listen address {value!r} names no path: unix:/run/comfy-progress/http.sock"
        )
    if not path.startswith("/"):
        raise ConfigError(f"listen address {value!r}: the socket path must be absolute")
    if len(os.fsencode(path)) > MAX_UNIX_PATH_BYTES:
        raise ConfigError(
            f"listen address {value!r}: a socket path has at most {MAX_UNIX_PATH_BYTES} bytes"
        )
    return Path(path)


def socket_mode(value: str) -> int:
    """'0660' -> 0o660: permission bits in octal, as chmod takes them."""
    if not re.fullmatch(r"0?[0-7]{3}", value):
        raise ConfigError(f"listen_mode {value!r} is not an octal mode like 0660")
    return int(value, 8)


def _field_type(name: str) -> type:
    default = FIELDS[name].default
    return type(default) if not isinstance(default, Path) else Path


def _url_list(raw: Any) -> tuple[str, ...]:
    """A TOML list of strings, or one comma- or space-separated string (env, flags)."""
    if isinstance(raw, str):
        return tuple(list_setting(raw))
    if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        return tuple(item.strip() for item in raw if item.strip())
    raise ValueError("expected a list of URLs")


def _convert(name: str, raw: Any, source: str) -> Any:
    """Check and convert one value; `raw` is a TOML value or a string from env/flags."""
    kind = _field_type(name)
    where = f"{name} (from {source})"
    try:
        if kind is tuple:
            value: Any = _url_list(raw)
        elif kind is bool:
            if isinstance(raw, bool):
                value = raw
            elif isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on"):
                value = True
            elif isinstance(raw, str) and raw.lower() in ("0", "false", "no", "off"):
                value = False
            else:
                raise ValueError("expected true or false")
        elif kind is int:
            if isinstance(raw, bool) or not isinstance(raw, int | str):
                raise ValueError("expected an integer")
            value = int(raw)
        elif kind is float:
            if isinstance(raw, bool) or not isinstance(raw, int | float | str):
                raise ValueError("expected a number")
            value = float(raw)
            if math.isnan(value):
                raise ValueError("expected a number")
            if math.isinf(value):
                # Durations become whole seconds for Redis expiries (int(inf) fails).
                raise ValueError("expected a finite number")
            if value > FLOAT_MAX:
                # Redis refuses an expiry past ~9e15 s: the first task to end in
                # shared mode failed on it. No duration or rate here needs more.
                raise ValueError(f"must be at most {FLOAT_MAX:.0f} (about 31 years)")
        elif kind is Path:
            if not isinstance(raw, str) or not raw:
                raise ValueError("expected a path")
            value = Path(raw)
        else:
            if not isinstance(raw, str):
                raise ValueError("expected a string")
            value = raw
    except ValueError as exc:
        raise ConfigError(f"bad value {raw!r} for {where}: {exc}") from None
    meta = FIELDS[name].metadata
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"bad value {raw!r} for {where}: must be at least {meta['min']}")
    if "choices" in meta and value not in meta["choices"]:
        choices = ", ".join(meta["choices"])
        raise ConfigError(f"bad value {raw!r} for {where}: choose one of {choices}")
    return value


def _check_known(keys: Mapping[str, Any], source: str) -> None:
    unknown = sorted(set(keys) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting(s) in {source}: {', '.join(unknown)}")


def from_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    _check_known(data, f"config file {path}")
    return {k: _convert(k, v, f"config file {path}") for k, v in data.items()}


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    # Only our prefix; other variables are none of our business.
    ours = {k[len(ENV_PREFIX) :].lower(): v for k, v in environ.items() if k.startswith(ENV_PREFIX)}
    ours.pop("config", None)  # COMFY_PROGRESS_CONFIG names the file, it is not a setting
    # The terminal client's token (`comfy-progress generate`), often exported in the
    # shell that starts the daemon too: not a setting (the daemon's is API_TOKENS).
    ours.pop(CLIENT_TOKEN_KEY, None)
    _check_known(ours, "the environment (COMFY_PROGRESS_*)")
    return {k: _convert(k, v, f"environment {ENV_PREFIX}{k.upper()}") for k, v in ours.items()}


def flag_source(name: str, flag_names: Mapping[str, str]) -> str:
    """How a setting was given on the command line: its own flag, or --set."""
    return f"flag {flag_names.get(name, f'--set {name}')}"


def from_flags(values: Mapping[str, str], flag_names: Mapping[str, str]) -> dict[str, Any]:
    _check_known(values, "command-line flags")
    secrets_given = sorted(k for k in values if FIELDS[k].metadata.get("secret"))
    if secrets_given:
        # A command line is readable by every user of the machine (ps, /proc).
        raise ConfigError(
            f"{', '.join(secrets_given)} cannot be set on the command line (other users"
            f" can read it): use {ENV_PREFIX}API_TOKENS, the config file, or api_tokens_file"
        )
    return {k: _convert(k, v, flag_source(k, flag_names)) for k, v in values.items()}


def load(
    *,
    config_file: Path | None,
    environ: Mapping[str, str],
    flags: Mapping[str, str],
    flag_names: Mapping[str, str] | None = None,
) -> Config:
    """TOML file < environment < flags, validated as a whole.

    `flag_names` maps a setting to the serve flag that sets it (the rest come
    from --set), so that an error names what was typed."""
    flag_names = flag_names or {}
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}  # setting -> where its value came from
    path = config_file
    if path is None and environ.get(f"{ENV_PREFIX}CONFIG"):
        path = Path(environ[f"{ENV_PREFIX}CONFIG"])
    if path is not None:
        from_file = from_toml(path)
        merged.update(from_file)
        sources.update(dict.fromkeys(from_file, f"config file {path}"))
    from_environment = from_env(environ)
    merged.update(from_environment)
    sources.update({k: f"environment {ENV_PREFIX}{k.upper()}" for k in from_environment})
    merged.update(from_flags(flags, flag_names))
    sources.update({k: flag_source(k, flag_names) for k in flags})
    config = Config(**merged)
    _check_one_kind_of_backend(config, sources)
    if not config.shared and config.role != "both":
        # Alone, a daemon is front and worker in one: the role would be ignored.
        raise ConfigError(
            f"role = {config.role} (from {sources['role']}) needs redis_url: a daemon"
            " without Redis takes requests and runs tasks both"
        )
    if config.shared and config.role == "worker" and not (config.backend_urls or config.simulate):
        # A front needs no ComfyUI; a worker has nothing to run its tasks on.
        raise ConfigError(
            f"role = worker (from {sources['role']}) needs a ComfyUI to run the tasks on:"
            " set comfy_url (or comfy_urls), or simulate = true"
        )
    if unix_socket_path(config.listen) is None:
        split_host_port(config.listen)
    socket_mode(config.listen_mode)
    for url in config.backend_urls:
        if not url.startswith("http://"):
            raise ConfigError(f"ComfyUI URL {url!r} must start with http://")
        if urllib.parse.urlsplit(url).password is not None:
            # The daemon would not send it, and the URL is in every log line and metric.
            raise ConfigError("a ComfyUI URL must not carry a user:password")
    if config.redis_url and not _is_redis_url(config.redis_url):
        # Not repeated: it may carry a password.
        raise ConfigError(
            "redis_url is not a Redis URL: give redis://HOST[:PORT][/DB] (rediss:// for"
            " TLS, unix:///PATH/TO/redis.sock for a socket)"
        )
    try:
        parse_networks(config.trusted_proxies)
    except ValueError as exc:
        raise ConfigError(f"bad value for trusted_proxies: {exc}") from None
    if config.max_upload_bytes > config.max_image_bytes:
        # Every image the daemon takes must be one it can serve.
        raise ConfigError("max_upload_bytes must be at most max_image_bytes")
    if config.reconnect_max_delay < config.reconnect_initial_delay:
        raise ConfigError("reconnect_max_delay must be at least reconnect_initial_delay")
    for origin in list_setting(config.allowed_origins):
        if parse_origin(origin) is None:
            raise ConfigError(
                f"allowed_origins: {origin!r} is not an origin like https://app.example:8443"
            )
    for host in list_setting(config.allowed_hosts):
        if split_host(host) is None:
            raise ConfigError(f"allowed_hosts: {host!r} is not a host name like comfy.example")
    return _with_token_file(config)


def _is_redis_url(url: str) -> bool:
    """A URL coredis connects to: else the daemon fails at its first command (coredis
    takes `localhost:6379` and fails with an AssertionError) or at its start."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return bool(parts.path)
    try:
        parts.port  # noqa: B018 (raises ValueError when it is not a number)
    except ValueError:
        return False
    return parts.scheme in ("redis", "rediss") and bool(parts.hostname)


def _check_one_kind_of_backend(config: Config, sources: Mapping[str, str]) -> None:
    """simulate beside a ComfyUI URL: the URLs would win and the simulator stay off."""
    if not (config.simulate and config.backend_urls):
        return
    given = [name for name in ("comfy_url", "comfy_urls") if getattr(config, name)]
    urls = " and ".join(f"{name} (from {sources[name]})" for name in given)
    raise ConfigError(
        f"simulate (from {sources['simulate']}) is on beside {urls}: the daemon uses the"
        " embedded simulator or ComfyUI URLs, not both; drop one (a flag clears a file's"
        " URL: --set comfy_url=)"
    )


MIN_TOKEN_CHARS: Final = 16
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]+")  # RFC 6750 b64token


def _with_token_file(config: Config) -> Config:
    """api_tokens plus the tokens of api_tokens_file, each checked."""
    tokens = list_setting(config.api_tokens)
    if config.api_tokens_file:
        path = Path(config.api_tokens_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read api_tokens_file {path}: {exc}") from None
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.append(line)
    for index, token in enumerate(tokens, 1):
        # The token itself is never put into a message.
        if not _TOKEN.fullmatch(token) or len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(
                f"API token #{index} must be at least {MIN_TOKEN_CHARS} characters of"
                " A-Z a-z 0-9 . _ ~ + / = - (try: openssl rand -hex 32)"
            )
    return dataclasses.replace(config, api_tokens=" ".join(tokens))


def list_setting(value: str) -> list[str]:
    """'a, b c' -> ['a', 'b', 'c']: list settings are space- or comma-separated."""
    return [item for item in re.split(r"[\s,]+", value) if item]


def load_from_process(
    config_file: Path | None, flags: Mapping[str, str], flag_names: Mapping[str, str]
) -> Config:
    return load(config_file=config_file, environ=os.environ, flags=flags, flag_names=flag_names)


def render_toml(config: Config) -> str:
    """The effective configuration as TOML, with each setting's help as a comment."""
    lines = []
    for name, f in FIELDS.items():
        value = getattr(config, name)
        lines.append(f"# {f.metadata['help']}")
        if f.metadata.get("secret") and value:
            lines.append(f"# {name} is set (not shown)")
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, tuple):
            text = "[" + ", ".join(_toml_string(item) for item in value) + "]"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = _toml_string(str(value))
        lines.append(f"{name} = {text}")
    return "\n".join(lines) + "\n"


def _toml_string(value: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped (a
    multi-line value from the file, say, would otherwise end the line)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\u{ord(m.group()):04x}", escaped)
    return f'"{escaped}"'
