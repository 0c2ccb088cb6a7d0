"""Runtime knobs: the mutable state fault injection changes, and the step gate.

The knobs are read at the moment they matter (each progress step, each frame
sent, each request accepted), so a change applies to a prompt that is running.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from daemon.simulator.config import SimulatorConfig


@dataclass
class SimulatorControls:
    """Mutable knobs; see the package docstring for what each one does."""

    step_time: float | None = None
    slow_factor: float = 1.0
    fail_at: str | None = None
    silent: bool = False
    # trio.current_time() until which new requests are reset; None: accepting.
    reject_until: float | None = None

    @classmethod
    def from_config(cls, config: SimulatorConfig) -> SimulatorControls:
        """Initial knob values from the frozen config."""
        return cls(step_time=config.step_time, slow_factor=config.slow_factor)

    def step_seconds(self, natural: float) -> float:
        """How long one progress step lasts now (a node's own delay, or the override)."""
        base = self.step_time if self.step_time is not None else natural
        return max(0.0, base * self.slow_factor)

    def rejecting_for(self) -> float:
        """Seconds left in a reject_connections window (0.0 when accepting)."""
        if self.reject_until is None:
            return 0.0
        left = self.reject_until - trio.current_time()
        if left <= 0:
            self.reject_until = None
            return 0.0
        return left


class StepGate:
    """Where a progress step waits: a clock normally, or explicit permits.

    In manual mode every step parks until :meth:`grant` hands out a permit, so a
    test can place an action exactly between two steps of a running prompt.
    A sleeping step re-reads its duration when poked, so a knob change applies
    to the step under way, not only to the next one.
    """

    def __init__(self, *, manual: bool = False) -> None:
        self.manual = manual
        self._permits = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._parked = 0

    @property
    def parked(self) -> bool:
        """True while a step waits for a permit."""
        return self._parked > 0

    async def wait(self, seconds: Callable[[], float]) -> None:
        """One step: until `seconds()` have passed since it began, or a permit (manual)."""
        start = trio.current_time()
        while True:
            if self.manual:
                await self._take_permit()
                return
            deadline = start + seconds()
            if trio.current_time() >= deadline:
                await trio.lowlevel.checkpoint()
                return
            with trio.move_on_at(deadline):
                await self._lot.park()  # woken early by poke() or set_manual()

    async def _take_permit(self) -> None:
        self._parked += 1
        try:
            while self._waiting():
                await self._lot.park()
        finally:
            self._parked -= 1
        if self._permits > 0:
            self._permits -= 1

    def _waiting(self) -> bool:
        return self.manual and self._permits == 0

    def grant(self, steps: int = 1) -> None:
        """Let `steps` more steps run (manual mode)."""
        self._permits += steps
        self._lot.unpark_all()

    def set_manual(self, manual: bool) -> None:
        """Switch modes; leaving manual mode releases a parked step at once."""
        self.manual = manual
        if not manual:
            self._permits = 0
        self._lot.unpark_all()

    def poke(self) -> None:
        """The step duration changed: sleeping steps recompute their deadline."""
        self._lot.unpark_all()


class ControlError(ValueError):
    """A /sim/control body that names an unknown knob or a bad value."""


# Order in which a control request is applied: settings before actions, so that
# e.g. {"fail_at": "2", "restart": true} restarts with the new setting in place.
CONTROL_KEYS = (
    "step_time",
    "slow_factor",
    "fail_at",
    "manual_steps",
    "go_silent",
    "drop_websockets",
    "restart",
    "reject_connections",
    "grant_steps",
)


def _number(key: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ControlError(f"{key} must be a number")
    if value < 0 or (positive and value == 0):
        raise ControlError(f"{key} must be {'> 0' if positive else '>= 0'}")
    return float(value)


def parse_control(body: Any) -> dict[str, Any]:
    """Validate a control request (a JSON object) into {knob: value}, in apply order."""
    if not isinstance(body, dict):
        raise ControlError("the body must be a JSON object")
    unknown = sorted(set(body) - set(CONTROL_KEYS))
    if unknown:
        raise ControlError(f"unknown knob(s): {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for key in CONTROL_KEYS:
        if key not in body:
            continue
        value = body[key]
        if key == "step_time":
            out[key] = None if value is None else _number(key, value)
        elif key == "slow_factor":
            out[key] = _number(key, value, positive=True)
        elif key == "fail_at":
            if value is not None and not isinstance(value, str):
                raise ControlError("fail_at must be a node id, a class_type or null")
            out[key] = value or None
        elif key in ("manual_steps", "go_silent", "drop_websockets", "restart"):
            if not isinstance(value, bool):
                raise ControlError(f"{key} must be true or false")
            out[key] = value
        elif key == "reject_connections":
            out[key] = _number(key, value)
        elif key == "grant_steps":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ControlError("grant_steps must be a non-negative integer")
            out[key] = value
    return out
