"""Configuration: TOML < environment < flags, with clear errors."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import config as cfg
from daemon.cli import _flag_names, _flag_settings, build_parser


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "comfy-progress.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    config = cfg.load(config_file=None, environ={}, flags={})
    assert config.listen == "127.0.0.1:8000"
    assert config.heartbeat_interval == 30.0
    assert config.task_retention == 300.0


def test_each_layer_overrides_the_one_before(tmp_path: Path) -> None:
    path = write(
        tmp_path, 'listen = "0.0.0.0:9000"\nheartbeat_interval = 10\nlog_level = "debug"\n'
    )
    environ = {"COMFY_PROGRESS_HEARTBEAT_INTERVAL": "20", "COMFY_PROGRESS_LOG_LEVEL": "warning"}
    config = cfg.load(config_file=path, environ=environ, flags={"log_level": "error"})
    assert config.listen == "0.0.0.0:9000"  # file only
    assert config.heartbeat_interval == 20.0  # env beats file
    assert config.log_level == "error"  # flag beats env


def test_config_file_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "task_retention = 5\n")
    config = cfg.load(config_file=None, environ={"COMFY_PROGRESS_CONFIG": str(path)}, flags={})
    assert config.task_retention == 5.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nope = 1\n", "unknown setting(s) in config file"),
        ("heartbeat_interval = -1\n", "must be at least"),
        ('heartbeat_interval = "soon"\n', "bad value 'soon' for heartbeat_interval"),
        ("simulate = 3\n", "expected true or false"),
        ('log_level = "loud"\n', "choose one of"),
        ("max_body_bytes = 1.5\n", "expected an integer"),
        ("listen = [\n", "is not valid TOML"),
        ('listen = "nowhere"\n', "is not HOST:PORT"),
        ('comfy_url = "ftp://x"\n', "must start with http://"),
        ('comfy_url = "http://me:secret@comfy:8188"\n', "must not carry a user:password"),
        ("heartbeat_interval = nan\n", "expected a number"),
        # int(inf) for a Redis expiry took a shared-mode daemon down at its first task.
        ("task_retention = inf\n", "expected a finite number"),
        ("lease_timeout = +inf\n", "expected a finite number"),
        # Past what Redis takes as an expiry (~9e15 s): no number that large is meant.
        ("task_retention = 1e17\n", "must be at most 1000000000"),
        # coredis took these and failed at the daemon's first command (an AssertionError
        # traceback for one without a scheme; a daemon retrying for ever for no host).
        ('redis_url = "localhost:6379"\n', "redis_url is not a Redis URL"),
        ('redis_url = "redis.lan"\n', "redis_url is not a Redis URL"),
        ('redis_url = "redis://"\n', "redis_url is not a Redis URL"),
        ('redis_url = "redis://redis.lan:port/0"\n', "redis_url is not a Redis URL"),
        ('redis_url = "unix://"\n', "redis_url is not a Redis URL"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(cfg.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg.load(config_file=write(tmp_path, text), environ={}, flags={})


def test_redis_urls_of_every_kind_coredis_takes_are_accepted() -> None:
    for url in (
        "redis://redis.lan",
        "redis://:secret@10.0.0.5:6380/2",
        "rediss://user:secret@redis.example:6379/0",
        "unix:///run/redis/redis.sock?db=1",
    ):
        assert cfg.load(config_file=None, environ={}, flags={"redis_url": url}).redis_url == url
    # The message never repeats the URL: it may carry a password.
    with pytest.raises(cfg.ConfigError) as refused:
        cfg.load(config_file=None, environ={}, flags={"redis_url": "secret@redis.lan:6379"})
    assert "secret" not in str(refused.value)


def test_errors_name_their_source() -> None:
    with pytest.raises(cfg.ConfigError, match="environment COMFY_PROGRESS_MAX_TASKS"):
        cfg.load(config_file=None, environ={"COMFY_PROGRESS_MAX_TASKS": "many"}, flags={})
    with pytest.raises(cfg.ConfigError, match=r"unknown setting.*COMFY_PROGRESS_"):
        cfg.load(config_file=None, environ={"COMFY_PROGRESS_TYPO": "1"}, flags={})
    with pytest.raises(cfg.ConfigError, match="environment COMFY_PROGRESS_IMAGE_RETENTION"):
        cfg.load(config_file=None, environ={"COMFY_PROGRESS_IMAGE_RETENTION": "inf"}, flags={})
    with pytest.raises(cfg.ConfigError, match="flag --set write_timeout"):
        cfg.load(config_file=None, environ={}, flags={"write_timeout": "x"})


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError, match="cannot read config file"):
        cfg.load(config_file=tmp_path / "absent.toml", environ={}, flags={})


def test_rendered_config_loads_back(tmp_path: Path) -> None:
    config = cfg.load(config_file=None, environ={}, flags={"heartbeat_interval": "12.5"})
    again = cfg.load(config_file=write(tmp_path, cfg.render_toml(config)), environ={}, flags={})
    assert again == config


def test_rendered_config_with_multi_line_and_control_characters_loads_back(
    tmp_path: Path,
) -> None:
    # A list setting written as a multi-line TOML string (one origin a line) is
    # a valid file; --print-config printed its newlines raw, and that output
    # was not TOML at all.
    path = write(
        tmp_path,
        'allowed_origins = """\nhttps://a.example\nhttps://b.example\n"""\n'
        'default_checkpoint = "odd\\u007fname\\\\ \\"quoted\\"\\u0001.safetensors"\n'
        'comfy_urls = ["http://b:2/a\\"b"]\n',
    )
    config = cfg.load(config_file=path, environ={}, flags={})
    printed = tmp_path / "printed.toml"
    printed.write_text(cfg.render_toml(config), encoding="utf-8")
    assert cfg.load(config_file=printed, environ={}, flags={}) == config


def test_several_comfyui_urls_from_each_layer(tmp_path: Path) -> None:
    path = write(tmp_path, 'comfy_url = "http://a:1"\ncomfy_urls = ["http://b:2/", "http://a:1"]\n')
    config = cfg.load(config_file=path, environ={}, flags={})
    assert config.backend_urls == ("http://a:1", "http://b:2")  # in order, each once
    environ = {"COMFY_PROGRESS_COMFY_URLS": "http://c:3, http://d:4"}
    config = cfg.load(config_file=path, environ=environ, flags={})
    assert config.backend_urls == ("http://a:1", "http://c:3", "http://d:4")
    with pytest.raises(cfg.ConfigError, match="must start with http://"):
        cfg.load(config_file=None, environ={"COMFY_PROGRESS_COMFY_URLS": "ftp://x"}, flags={})
    with pytest.raises(cfg.ConfigError, match="expected a list of URLs"):
        cfg.load(config_file=write(tmp_path, "comfy_urls = 3\n"), environ={}, flags={})


def test_repeated_comfy_url_flags_and_simulate_n() -> None:

    args = build_parser().parse_args(
        ["serve", "--comfy-url", "http://a:1", "--comfy-url", "http://b:2"]
    )
    config = cfg.load(config_file=None, environ={}, flags=_flag_settings(args))
    assert config.backend_urls == ("http://a:1", "http://b:2")
    args = build_parser().parse_args(["serve", "--simulate", "3"])
    config = cfg.load(config_file=None, environ={}, flags=_flag_settings(args))
    assert (config.simulate, config.simulators) == (True, 3)
    args = build_parser().parse_args(["serve", "--simulate"])
    config = cfg.load(config_file=None, environ={}, flags=_flag_settings(args))
    assert (config.simulate, config.simulators) == (True, 1)


def load_flags(args: argparse.Namespace) -> cfg.Config:
    """As `serve` loads its flags: named as typed in errors."""
    return cfg.load(
        config_file=None, environ={}, flags=_flag_settings(args), flag_names=_flag_names(args)
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # The error names what the user typed, not a flag that does not exist.
        (["--simulate", "0"], r"simulators \(from flag --simulate\): must be at least 1"),
        (["--set", "simulators=0"], r"simulators \(from flag --set simulators\)"),
        (
            ["--set", "heartbeat_interval=soon"],
            r"heartbeat_interval \(from flag --set heartbeat_interval\)",
        ),
        (
            ["--comfy-url", "http://a:1", "--comfy-url", "ftp://b"],
            r"ComfyUI URL 'ftp://b' must start with http://",
        ),
    ],
)
def test_a_bad_flag_is_named_as_typed(argv: list[str], message: str) -> None:
    args = build_parser().parse_args(["serve", *argv])
    with pytest.raises(cfg.ConfigError, match=message):
        load_flags(args)


def test_simulate_beside_a_comfyui_url_is_refused(tmp_path: Path) -> None:
    # The daemon used the URL and silently left the simulator off.
    args = build_parser().parse_args(["serve", "--simulate", "--comfy-url", "http://a:1"])
    with pytest.raises(cfg.ConfigError, match=r"simulate \(from flag --simulate\).*comfy_url"):
        load_flags(args)
    path = write(tmp_path, 'comfy_url = "http://a:1"\n')
    with pytest.raises(cfg.ConfigError, match=r"comfy_url \(from config file .*\)"):
        cfg.load(config_file=path, environ={"COMFY_PROGRESS_SIMULATE": "true"}, flags={})
    environ = {"COMFY_PROGRESS_COMFY_URLS": "http://b:2", "COMFY_PROGRESS_SIMULATE": "1"}
    with pytest.raises(cfg.ConfigError, match=r"comfy_urls \(from environment"):
        cfg.load(config_file=None, environ=environ, flags={})
    # A flag clears the file's URL, and then the simulator is the backend.
    args = build_parser().parse_args(["serve", "--simulate", "--set", "comfy_url="])
    config = cfg.load(config_file=path, environ={}, flags=_flag_settings(args))
    assert (config.simulate, config.backend_urls) == (True, ())
    # simulate = false beside a URL is what every pool configuration says.
    config = cfg.load(config_file=path, environ={"COMFY_PROGRESS_SIMULATE": "false"}, flags={})
    assert config.backend_urls == ("http://a:1",)


def test_a_worker_without_a_comfyui_is_a_configuration_error(tmp_path: Path) -> None:
    # As comfy-progress-worker.service starts it (COMFY_PROGRESS_ROLE=worker) with
    # a worker.toml that names Redis but no ComfyUI: one line and exit 2, as every
    # configuration error; it was an ExceptionGroup traceback from inside the start.
    path = write(tmp_path, 'redis_url = "redis://127.0.0.1:1/0"\n')
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith(cfg.ENV_PREFIX)},
        "COMFY_PROGRESS_CONFIG": str(path),
        "COMFY_PROGRESS_ROLE": "worker",
    }
    serve = [sys.executable, "-m", "daemon.cli", "serve", "--data-dir", str(tmp_path / "data")]
    done = subprocess.run(serve, env=environ, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "comfy-progress: configuration error: role = worker (from environment"
        " COMFY_PROGRESS_ROLE) needs a ComfyUI to run the tasks on: set comfy_url"
        " (or comfy_urls), or simulate = true\n"
    )
    # A front needs none, and a worker with a URL (or the simulator) is fine.
    environ["COMFY_PROGRESS_ROLE"] = "front"
    cfg.load(config_file=path, environ=environ, flags={})
    environ["COMFY_PROGRESS_ROLE"] = "worker"
    cfg.load(config_file=path, environ=environ, flags={"comfy_url": "http://a:1"})
    cfg.load(config_file=path, environ=environ, flags={"simulate": "true"})


@pytest.mark.parametrize("role", ["front", "worker"])
def test_a_role_without_redis_is_a_configuration_error(role: str) -> None:
    # Without redis_url a daemon is front and worker in one: a role=worker daemon
    # served the whole API, a role=front one ran tasks, and nothing said so.
    environ = {"COMFY_PROGRESS_ROLE": role}
    message = rf"role = {role} \(from environment COMFY_PROGRESS_ROLE\) needs redis_url"
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.load(config_file=None, environ=environ, flags={})
    config = cfg.load(config_file=None, environ={"COMFY_PROGRESS_ROLE": "both"}, flags={})
    assert config.role == "both"
