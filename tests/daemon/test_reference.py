"""README.md's generated tables match the code (config settings, metrics)."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import config
from daemon.ops import reference


def test_readme_tables_match_the_code() -> None:
    text = reference.README.read_text(encoding="utf-8")
    assert reference.update(text) == text, "README.md is out of date: run `make docs`"


def test_every_setting_and_metric_is_in_the_readme() -> None:
    text = reference.README.read_text(encoding="utf-8")
    for name in config.FIELDS:
        assert f"| `{name}` | `COMFY_PROGRESS_{name.upper()}` |" in text
    assert reference.serve_flags() == {
        "listen": "--listen",
        "comfy_url": "--comfy-url",
        "simulate": "--simulate",
        "data_dir": "--data-dir",
        "log_level": "--log-level",
    }


def test_a_missing_block_is_an_error() -> None:
    with pytest.raises(ValueError, match="lacks the generated block"):
        reference.update("<!-- BEGIN GENERATED config -->\n<!-- END GENERATED config -->\n")
    with pytest.raises(ValueError, match="unknown generated block"):
        reference.update("<!-- BEGIN GENERATED nope -->\n<!-- END GENERATED nope -->\n")


def test_check_mode_reports_a_stale_readme(tmp_path: Path) -> None:
    stale = tmp_path / "README.md"
    stale.write_text(
        "<!-- BEGIN GENERATED config -->\nold\n<!-- END GENERATED config -->\n"
        "<!-- BEGIN GENERATED metrics -->\n<!-- END GENERATED metrics -->\n"
    )
    assert reference.main(["--check", "--readme", str(stale)]) == 1
    assert reference.main(["--readme", str(stale)]) == 0
    assert reference.main(["--check", "--readme", str(stale)]) == 0
    assert "| `heartbeat_interval` |" in stale.read_text()


def test_a_list_setting_shows_its_default_as_toml_writes_it() -> None:
    text = reference.README.read_text(encoding="utf-8")
    assert "| `comfy_urls` | `COMFY_PROGRESS_COMFY_URLS` | `--set comfy_urls=...` | `[]` |" in text
    assert config.render_toml(config.Config()).count("comfy_urls = []") == 1
