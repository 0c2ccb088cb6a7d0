"""A task journal that is not a database (a damaged disk, a file copied over it)
stops the daemon with one clear line naming the file, not SQLite's traceback."""

from __future__ import annotations

from pathlib import Path

from tests.ops.harness import running_daemon


async def test_a_damaged_journal_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    journal = tmp_path / "data" / "journal.sqlite3"
    journal.parent.mkdir()
    journal.write_bytes(b"this is no SQLite database\n" * 400)
    async with running_daemon(tmp_path, "--simulate", wait_ready=False) as daemon:
        await daemon.process.wait()
        assert daemon.process.returncode == 1
        lines = [line for line in daemon.log().splitlines() if "level=error" in line]
        assert len(lines) == 1, daemon.log()
        assert f"the daemon stopped: cannot use the task journal {journal}" in lines[0]
        assert "file is not a database" in lines[0]
        assert daemon.drain() == []  # never READY
