"""The snapshot's `progress.preview` and `progress.text` fields."""

from __future__ import annotations

from protocol import comfy, task
from tests.protocol.test_task import IMG, RUNNING, fresh, published, run


def test_a_preview_announcement_publishes_its_versioned_url() -> None:
    state, _ = run(fresh(), *RUNNING)
    state, effects = run(state, task.PreviewReady(3))
    [message] = published(effects)
    # Named by the snapshot that announces it, not by the store's version: snapshot
    # versions go on rising after a restart or on another worker, the store's do not.
    assert message.payload["progress"]["preview"] == {
        "url": f"/tasks/T/preview?v={message.version}",
        "version": message.version,
    }
    # An older announcement arriving late changes nothing.
    state, effects = run(state, task.PreviewReady(2))
    assert published(effects) == []
    # Later progress snapshots keep naming the newest preview.
    state, effects = run(state, comfy.Progress("P", "3", 2, 20))
    later = published(effects)[0]
    assert later.payload["progress"]["preview"]["version"] == message.version
    # The next preview: the next snapshot's version.
    state, effects = run(state, task.PreviewReady(4))
    [newer] = published(effects)
    assert newer.payload["progress"]["preview"]["version"] == newer.version > later.version


def test_progress_text_shows_while_its_node_runs() -> None:
    state, _ = run(fresh(), *RUNNING)
    assert "text" not in task.render(state, 0).payload["progress"]
    state, effects = run(state, comfy.ProgressText("3", "step 1/20"))
    assert published(effects)[0].payload["progress"]["text"] == "step 1/20"
    state, effects = run(state, comfy.Executing("8", "P"))
    assert "text" not in published(effects)[0].payload["progress"]


def test_a_finished_task_shows_neither_field() -> None:
    state, _ = run(fresh(), *RUNNING, task.PreviewReady(1), comfy.ProgressText("3", "x"))
    state, _ = run(
        state,
        comfy.Executed("P", "9", "9", {}, (IMG,)),
        comfy.ExecutionSuccess("P"),
        task.OutputsStored(("a.png",)),
    )
    assert state.phase is task.Phase.COMPLETED
    progress = task.render(state, 0).payload["progress"]
    assert "preview" not in progress
    assert "text" not in progress
