"""What a backend's reading says it lacks for a graph: the first thing, by name."""

from __future__ import annotations

from daemon.comfy.capabilities import Capabilities, Needs


def needs(classes: set[str], checkpoints: frozenset[str] | set[str] = frozenset()) -> Needs:
    return Needs(frozenset(classes), frozenset(checkpoints))


READING = Capabilities(
    present=frozenset({"KSampler", "SaveImage"}),
    absent=frozenset({"Zeta", "Alpha", "Mid"}),
    checkpoints=frozenset({"a.safetensors"}),
)


def test_nothing_missing_is_none() -> None:
    assert READING.missing(needs({"KSampler", "SaveImage"}, {"a.safetensors"})) is None
    assert READING.missing(needs(set())) is None


def test_the_first_absent_class_by_name_is_named() -> None:
    assert READING.missing(needs({"Zeta", "KSampler", "Mid"})) == "node class Mid"
    assert READING.missing(needs({"Zeta", "Alpha"}, {"x.ckpt"})) == "node class Alpha"


def test_a_missing_checkpoint_is_named_after_the_classes() -> None:
    assert (
        READING.missing(needs({"KSampler"}, {"z.ckpt", "b.ckpt", "a.safetensors"}))
        == "checkpoint b.ckpt"
    )


def test_without_a_checkpoint_list_no_checkpoint_is_missing() -> None:
    reading = Capabilities(frozenset({"KSampler"}), frozenset(), checkpoints=None)
    assert reading.missing(needs({"KSampler"}, {"anything.ckpt"})) is None
