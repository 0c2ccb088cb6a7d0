"""GET /metrics after real generations against the simulator, read by Prometheus' parser."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from daemon.http.client import http_request
from daemon.ops import metrics
from daemon.ops.prometheus import CONTENT_TYPE
from protocol.sse import ServerSentEvent
from tests.daemon.harness import Daemon, read_events, running_daemon


class Scrape:
    """One reading of /metrics: every sample, looked up by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        """The one sample called `name` whose labels include `labels` (0 when absent)."""
        found = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(found) <= 1, (name, labels, found)
        return float(found[0]) if found else 0.0

    def labels_of(self, name: str) -> list[dict[str, str]]:
        return [dict(s.labels) for s in self.samples if s.name == name]


async def scrape(daemon: Daemon) -> Scrape:
    response = await daemon.request("GET", "/metrics")
    assert response.status == 200
    assert response.headers.get("content-type") == CONTENT_TYPE
    return Scrape(response.text())


def P(name: str) -> str:
    return metrics.PREFIX + name


async def wait_connected(daemon: Daemon) -> None:
    while not daemon.app.backend.is_connected():
        await daemon.app.backend.connected_changed.wait()


async def test_metrics_count_a_real_generation(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        await wait_connected(daemon)
        before = await scrape(daemon)
        assert before.value(P("tasks"), state="completed") == 0
        assert before.value(P("generation_duration_seconds_count"), outcome="completed") == 0

        task_id = await daemon.generate(seed=42)
        events = await daemon.events(task_id)
        assert events[-1].event == "complete"
        status = await daemon.request("GET", f"/tasks/{task_id}")
        assert status.status == 200

        after = await scrape(daemon)
        assert after.value(P("tasks"), state="completed") == 1
        for state in ("queued", "running", "error"):
            assert after.value(P("tasks"), state=state) == 0
        duration = P("generation_duration_seconds")
        assert after.value(f"{duration}_count", outcome="completed") == 1
        assert after.value(f"{duration}_bucket", outcome="completed", le="+Inf") == 1
        assert after.value(f"{duration}_bucket", outcome="completed", le="600.0") == 1
        assert 0 < after.value(f"{duration}_sum", outcome="completed") < 60
        assert after.value(f"{duration}_count", outcome="error") == 0

        requests = P("http_requests_total")
        assert after.value(requests, method="POST", route="/generate", status="202") == 1
        assert after.value(requests, method="GET", route="/progress/{task_id}", status="200") == 1
        assert after.value(requests, method="GET", route="/tasks/{task_id}", status="200") == 1
        # The scrape before this one is counted too.
        assert after.value(requests, method="GET", route="/metrics", status="200") == 1
        # Routes are patterns: no task id (or any raw path) becomes a label value.
        assert task_id not in after.text
        assert {labels["route"] for labels in after.labels_of(requests)} <= {
            "/generate",
            "/progress/{task_id}",
            "/tasks/{task_id}",
            "/metrics",
        }

        assert after.value(P("sse_events_total")) == len(events)
        assert after.value(P("sse_subscribers")) == 0  # the stream has ended
        backend = daemon.bound.comfy_url
        assert after.value(P("backend_up"), backend=backend) == 1
        assert after.value(P("backend_frames_total"), backend=backend) > len(events) / 2
        assert after.value(P("backend_reconnects_total"), backend=backend) == 0
        assert after.value(P("backend_protocol_errors_total"), backend=backend) == 0
        assert after.value(P("http_connections")) >= 1  # this scrape's own
        assert after.value(P("build_info"), version=daemon.app.metrics.version) == 1


async def test_failed_and_cancelled_tasks_have_their_own_outcomes(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        sim = daemon.simulator
        assert sim is not None
        sim.set_fail_at("KSampler")
        failed = await daemon.generate()
        assert json.loads((await daemon.events(failed))[-1].data)["error"]["code"] == "comfy_error"
        sim.set_fail_at(None)

        # Manual steps: the sampler waits for permits, so the first task is
        # surely running (its stream open) and the second queued behind it.
        sim.set_manual_steps(True)
        running = await daemon.generate()
        live = trio.Event()

        def note(event: ServerSentEvent) -> bool:
            if json.loads(event.data).get("phase") == "running":
                live.set()
            return event.event != "progress"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(read_events, daemon.url, running, stop_after=note))
            await live.wait()
            queued = await daemon.generate()
            during = await scrape(daemon)
            assert during.value(P("sse_subscribers")) == 1
            assert during.value(P("tasks"), state="running") == 1
            assert during.value(P("tasks"), state="queued") == 1
            assert (await daemon.request("DELETE", f"/tasks/{queued}")).status == 202
            cancelled = json.loads((await daemon.events(queued))[-1].data)
            assert cancelled["error"]["code"] == "cancelled"
            sim.set_manual_steps(False)  # the first task runs to its end
        after = await scrape(daemon)

    duration = P("generation_duration_seconds_count")
    assert after.value(duration, outcome="error") == 1
    assert after.value(duration, outcome="cancelled") == 1
    assert after.value(duration, outcome="completed") == 1
    assert after.value(P("task_errors_total"), code="comfy_error") == 1
    assert after.value(P("task_errors_total"), code="cancelled") == 1
    assert after.value(P("tasks"), state="error") == 2
    assert after.value(P("tasks"), state="completed") == 1
    assert after.value(P("sse_subscribers")) == 0


async def test_errors_refusals_and_reconnects(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        await wait_connected(daemon)
        assert (await daemon.request("GET", "/tasks/not-a-task")).status == 404
        assert (await daemon.request("PUT", "/generate", {})).status == 405
        assert (await daemon.request("BREW", "/coffee")).status == 405
        bad = await daemon.request("POST", "/generate", {"prompt": "x", "seed": -1})
        assert bad.status == 400
        too_big_head = await http_request(
            "GET", daemon.url + "/healthz", headers=[("X-Padding", "x" * 20_000)], timeout=10
        )
        assert too_big_head.status == 431

        backend = daemon.app.backend
        seen = backend.reconnected.count
        assert daemon.simulator is not None
        daemon.simulator.drop_websockets()
        while backend.reconnected.count == seen:
            await backend.reconnected.wait()
        await wait_connected(daemon)

        found = await scrape(daemon)
        requests = P("http_requests_total")
        assert found.value(requests, method="GET", route="/tasks/{task_id}", status="404") == 1
        assert found.value(requests, method="PUT", route="unmatched", status="405") == 1
        # Unknown methods share one label value: clients cannot invent series.
        assert found.value(requests, method="other", route="unmatched", status="405") == 1
        assert found.value(requests, method="POST", route="/generate", status="400") == 1
        assert found.value(P("http_rejected_total"), status="431") == 1
        assert found.value(P("backend_reconnects_total"), backend=backend.name) == 1
        assert found.value(P("backend_up"), backend=backend.name) == 1
        assert "not-a-task" not in found.text


async def test_served_families_are_exactly_the_documented_ones(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        found = await scrape(daemon)
    served: dict[str, Any] = {}
    for family in found.families.values():
        served[family.name] = (family.type, family.documentation)
    documented = {
        spec.name.removesuffix("_total") if spec.type == "counter" else spec.name: (
            spec.type,
            spec.help,
        )
        for spec in metrics.METRICS
    }
    assert served == documented
    # HELP and TYPE once per family, in METRICS order.
    names = [line.split()[2] for line in found.text.splitlines() if line.startswith("# TYPE")]
    assert names == [spec.name for spec in metrics.METRICS]
