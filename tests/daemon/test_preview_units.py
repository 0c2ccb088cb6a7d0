"""Previews, unit by unit: attribution per backend, the bounded store, the throttle."""

from __future__ import annotations

import json

import trio
import trio.testing

from daemon.comfy.attribution import PreviewAttribution
from daemon.images.previews import PreviewStore
from daemon.tasks.preview_throttle import PreviewThrottle
from protocol import comfy
from tests.transcripts import load, rebuild_binary


def _frames_of(transcript: str, conn: str) -> list[comfy.ComfyEvent]:
    events: list[comfy.ComfyEvent] = []
    for record in load(transcript):
        if record.get("conn") != conn:
            continue
        if record["kind"] == "ws_text":
            events.append(comfy.parse_text_frame(json.dumps(record["msg"])))
        elif record["kind"] == "ws_binary":
            events.append(comfy.parse_binary_frame(rebuild_binary(record["frame"])))
    return events


def _attributed(conn: str) -> list[tuple[str, str | None]]:
    """(event type, attributed prompt) for every preview and text on one socket of s8."""
    attribution = PreviewAttribution()
    out = []
    for event in _frames_of("s8_previews", conn):
        if isinstance(
            event, comfy.PreviewImage | comfy.PreviewImageWithMetadata | comfy.ProgressText
        ):
            out.append((type(event).__name__, attribution.prompt_for(event)))
        attribution.observe(event)
    return out


LEGACY_PROMPT = "5600db89-fe6d-462b-8506-8ddbbd63c033"
FLAGS_PROMPT = "f09d2a25-5094-46ad-ab4f-74df8fb436e6"


def test_legacy_previews_and_texts_belong_to_the_prompt_running_for_us() -> None:
    seen = _attributed("A_legacy")
    run1 = seen[:6]
    assert run1 == [("ProgressText", LEGACY_PROMPT), ("PreviewImage", LEGACY_PROMPT)] * 3
    # Run 2 is another client's prompt: its broadcast texts reach this socket but are not ours.
    assert seen[6:] == [("ProgressText", None), ("ProgressText", None)]


def test_type_4_previews_name_their_prompt_and_a_bystander_owns_no_text() -> None:
    assert (
        _attributed("F_flags")
        == [
            ("ProgressText", FLAGS_PROMPT),
            ("PreviewImageWithMetadata", FLAGS_PROMPT),
        ]
        * 2
    )
    assert {prompt for _, prompt in _attributed("B_bystander")} == {None}


def test_a_reconnect_forgets_the_running_prompt_until_comfyui_names_it_again() -> None:
    attribution = PreviewAttribution()
    text = comfy.ProgressText(node_id="3", text="step 1")
    attribution.observe(comfy.ExecutionStart(prompt_id="p1"))
    attribution.reset()
    assert attribution.prompt_for(text) is None
    # The reconnect re-send `executing {node}` carries no prompt_id: it says nothing
    # of which prompt runs (the backend learns that from a /queue reading).
    attribution.observe(comfy.Executing(node="3", prompt_id=None))
    assert attribution.prompt_for(text) is None
    # The next node's `executing` names its prompt, and is sent only to its submitter.
    attribution.observe(comfy.Executing(node="4", prompt_id="p2"))
    assert attribution.prompt_for(text) == "p2"
    attribution.observe(comfy.Executing(node=None, prompt_id="p1"))  # not the running one
    assert attribution.prompt_for(text) == "p2"
    attribution.observe(comfy.Executing(node=None, prompt_id="p2"))
    assert attribution.prompt_for(text) is None


def test_store_keeps_the_newest_preview_per_task_with_growing_versions() -> None:
    store = PreviewStore(max_task_bytes=100, max_total_bytes=1000)
    assert store.put("a", "image/jpeg", b"1" * 10) == 1
    assert store.put("a", "image/png", b"2" * 20) == 2
    preview = store.get("a")
    assert preview is not None
    assert (preview.version, preview.media_type, preview.data) == (2, "image/png", b"2" * 20)
    assert store.total_bytes == 20
    store.drop("a")
    assert store.get("a") is None
    assert store.total_bytes == 0


def test_store_refuses_a_preview_over_the_task_limit_or_of_a_foreign_type() -> None:
    store = PreviewStore(max_task_bytes=100, max_total_bytes=1000)
    assert store.put("a", "image/jpeg", b"x" * 101) is None
    assert store.put("a", "text/html", b"<script>") is None
    assert store.get("a") is None
    assert store.refused == 2


def test_store_evicts_the_stalest_previews_beyond_the_total_limit() -> None:
    store = PreviewStore(max_task_bytes=100, max_total_bytes=250)
    store.put("a", "image/jpeg", b"a" * 100)
    store.put("b", "image/jpeg", b"b" * 100)
    store.put("a", "image/jpeg", b"A" * 100)  # a is now fresher than b
    store.put("c", "image/jpeg", b"c" * 100)
    assert store.get("b") is None
    assert [store.get(t) is not None for t in "ac"] == [True, True]
    assert store.total_bytes == 200
    assert store.evicted == 1
    # Versions keep growing across an eviction: a version names one image.
    store.put("b", "image/jpeg", b"B" * 100)
    preview = store.get("b")
    assert preview is not None
    assert preview.version == 2


async def test_throttle_50_per_second_in_at_most_max_rate_out_newest_last(
    autojump_clock: trio.testing.MockClock,
) -> None:
    max_rate = 4
    announced: list[tuple[float, int]] = []
    throttle = PreviewThrottle(max_rate, lambda v: announced.append((trio.current_time(), v)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(throttle.run)
        start = trio.current_time()
        for version in range(1, 151):  # 3 s at 50 previews per second
            throttle.offer(version)
            await trio.sleep(1 / 50)
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    times = [t - start for t, _ in announced]
    versions = [v for _, v in announced]
    assert versions[0] == 1  # the first preview goes out at once
    assert versions[-1] == 150  # the newest always wins, and is announced last
    assert versions == sorted(versions)
    for t in times:  # every one-second window
        assert sum(1 for u in times if t <= u < t + 1) <= max_rate
    assert len(announced) >= 3 * max_rate  # and it does announce, at the full rate
