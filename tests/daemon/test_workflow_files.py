"""Workflow files: the shipped ones, the user's directory, and clear start-up errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.workflow_files import SHIPPED_DIR, WorkflowFileError, load_catalog
from tests.protocol.workflow_samples import CHECKPOINT, txt2img_definition


def write(directory: Path, name: str, content: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content), "utf-8")
    return path


def test_the_shipped_workflows() -> None:
    catalog = load_catalog(None, default_checkpoint="mine.safetensors")
    assert sorted(catalog.workflows) == ["inpaint", "txt2img"]
    for workflow in catalog.workflows.values():
        assert workflow.parameters["checkpoint"].default == "mine.safetensors"


def test_user_workflows_are_added_and_may_replace_shipped_ones(tmp_path: Path) -> None:
    mine = txt2img_definition()
    mine["description"] = "my own txt2img"
    write(tmp_path, "txt2img.json", mine)
    write(tmp_path, "portrait.json", txt2img_definition())
    write(tmp_path, ".hidden.json", "not even JSON")  # editors' temporary files
    write(tmp_path, "notes.txt", "not a workflow")
    catalog = load_catalog(tmp_path, default_checkpoint=CHECKPOINT)
    assert sorted(catalog.workflows) == ["inpaint", "portrait", "txt2img"]
    assert catalog.workflows["txt2img"].description == "my own txt2img"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "broken.json: is not valid JSON: Expecting property name"),
        (b"\xff\xfe{}", "broken.json: is not UTF-8 text"),
        ({"graph": {}}, "broken.json: graph: has no nodes"),
        (
            {**txt2img_definition(), "parameters": {"w": {"type": "integer", "min": 1, "max": 2}}},
            "broken.json: parameters.w.bind: must be a non-empty list",
        ),
    ],
)
def test_a_broken_file_is_named_with_its_problem(
    tmp_path: Path, content: object, message: str
) -> None:
    path = write(tmp_path, "broken.json", content)
    with pytest.raises(WorkflowFileError) as caught:
        load_catalog(tmp_path, default_checkpoint=CHECKPOINT)
    assert str(caught.value).startswith(str(path.parent))
    assert message in str(caught.value)


def _with_cfg_limit(key: str, value: float) -> dict[str, object]:
    definition = txt2img_definition()
    definition["parameters"]["cfg"][key] = value
    return definition


@pytest.mark.parametrize(
    ("key", "value"),
    # An int past any float: math.isfinite raised OverflowError, a traceback at the start.
    [
        ("min", math.nan),
        ("max", math.inf),
        ("min", -math.inf),
        pytest.param("max", 10**400, id="max-int-past-float"),
    ],
)
def test_a_number_limit_must_be_finite(tmp_path: Path, key: str, value: float) -> None:
    # Python's JSON reader takes NaN and Infinity. A NaN min compared false with
    # every value, so the limit was silently not applied, and GET /workflows
    # served it as NaN or Infinity, which no JSON parser (JSON.parse) reads.
    write(tmp_path, "odd.json", _with_cfg_limit(key, value))  # json.dumps writes NaN, Infinity
    with pytest.raises(WorkflowFileError, match=rf"odd\.json: parameters\.cfg\.{key}: must be"):
        load_catalog(tmp_path, default_checkpoint=CHECKPOINT)


@pytest.mark.parametrize(("low", "high"), [(-100, -1), (-1, 2**64 - 1), (2**64, 2**65)])
def test_the_seed_range_lies_within_what_a_request_may_give(
    tmp_path: Path, low: int, high: int
) -> None:
    # A request's seed is 0 to 2^64-1 (ComfyUI's unsigned 64-bit seed). A file
    # whose seed range left it was loaded: the daemon then drew seeds below 0
    # (or above 2^64-1) for requests without one and sent them to ComfyUI.
    definition = txt2img_definition()
    definition["parameters"]["seed"].update(min=low, max=high)
    write(tmp_path, "odd.json", definition)
    with pytest.raises(WorkflowFileError, match=r"odd\.json: parameters\.seed: .*0 to 2\^64-1"):
        load_catalog(tmp_path, default_checkpoint=CHECKPOINT)


def _nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, "deep graph input"])
def test_a_file_nested_too_deeply_is_named_with_its_problem(tmp_path: Path, content: str) -> None:
    # Python's JSON reader, and the walk that stores the graph, recurse: a file
    # nested deeper than the interpreter allows stopped `serve` with a
    # RecursionError traceback and exit status 1, not the file and exit 2.
    if content == "deep graph input":
        definition = txt2img_definition()
        definition["graph"]["3"]["inputs"]["extra"] = _nested(900)
        content = json.dumps(definition)
    write(tmp_path, "deep.json", content)
    with pytest.raises(WorkflowFileError, match=r"deep\.json: is nested too deeply"):
        load_catalog(tmp_path, default_checkpoint=CHECKPOINT)


def test_the_prompt_length_lies_within_what_a_request_may_give(tmp_path: Path) -> None:
    # A request's prompt is refused past 10,000 characters whatever its workflow
    # says: a file that allowed 20,000 was loaded, GET /workflows said so, and a
    # 15,000-character prompt was refused all the same.
    definition = txt2img_definition()
    definition["parameters"]["prompt"]["maxLength"] = 20_000
    write(tmp_path, "long.json", definition)
    with pytest.raises(
        WorkflowFileError, match=r"long\.json: parameters\.prompt\.maxLength: .*at most 10000"
    ):
        load_catalog(tmp_path, default_checkpoint=CHECKPOINT)
    definition["parameters"]["prompt"]["maxLength"] = 10_000
    write(tmp_path, "long.json", definition)
    load_catalog(tmp_path, default_checkpoint=CHECKPOINT)


def test_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(WorkflowFileError, match="the workflow directory does not exist"):
        load_catalog(tmp_path / "nope", default_checkpoint=CHECKPOINT)


def test_an_unreadable_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "dir.json").mkdir()  # matches *.json but cannot be read as a file
    with pytest.raises(WorkflowFileError, match=r"dir\.json: cannot read it"):
        load_catalog(tmp_path, default_checkpoint=CHECKPOINT)


def test_shipped_files_sit_in_the_package() -> None:
    assert sorted(p.name for p in SHIPPED_DIR.glob("*.json")) == ["inpaint.json", "txt2img.json"]


def test_serve_stops_with_the_file_and_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # serve() points the root logger at stderr; keep the test run's logging as it is.
    monkeypatch.setattr("daemon.cli.setup_logging", lambda level: None)
    path = write(tmp_path / "workflows", "bad.json", {"graph": {"1": {"class_type": "X"}}})
    code = main(
        [
            "serve",
            "--data-dir",
            str(tmp_path / "data"),
            "--set",
            f"workflows_dir={path.parent}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"comfy-progress: workflow error: {path}: graph.1.inputs: must be a JSON object" in err
