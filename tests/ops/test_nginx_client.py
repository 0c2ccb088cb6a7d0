"""Through the shipped nginx site: /metrics is private, the terminal client works under /comfy/."""

from __future__ import annotations

from pathlib import Path

import trio

from daemon.http.client import http_request
from tests.daemon.cli_process import check_png, run_generate
from tests.ops.harness import NginxProcess, run_nginx, running_daemon


async def test_metrics_are_private_and_the_client_works_under_the_sub_path(
    tmp_path: Path,
) -> None:
    async with (
        running_daemon(tmp_path, "--simulate", "--set", "simulator_step_time=0.01") as daemon,
        trio.open_nursery() as nursery,
    ):
        upstream_port = int(daemon.url.rsplit(":", 1)[1])
        nginx: NginxProcess = await nursery.start(run_nginx, tmp_path, upstream_port)
        site = f"{nginx.url}/comfy"

        hidden = await http_request("GET", f"{site}/metrics", timeout=10)
        assert hidden.status == 403
        direct = await http_request("GET", f"{daemon.url}/metrics", timeout=10)
        assert direct.status == 200
        assert b"# TYPE comfy_progress_tasks gauge" in direct.body

        target = tmp_path / "fox.png"
        done = await run_generate("a red fox", "--server", site, "--output", str(target))
        assert done.returncode == 0, done.stderr.decode()
        url = done.stdout.decode().strip()
        assert url.startswith(f"{site}/image/")
        image = await http_request("GET", url, timeout=10)
        assert image.status == 200
        saved = await trio.Path(target).read_bytes()
        assert saved == image.body
        check_png(saved)
        nursery.cancel_scope.cancel()
