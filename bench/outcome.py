"""What a scenario reports: rows of baseline against fleet, each with its target."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Outcome", "Row"]


@dataclass
class Row:
    """One compared figure: medians over repetitions unless ``metric`` says otherwise."""

    metric: str
    baseline: str
    fleet: str
    compared: str
    target: str
    met: bool | None = None


@dataclass
class Outcome:
    """One scenario (or one pool's run of it): what ran, the table, the raw repetitions."""

    key: str
    title: str
    setup: str
    baseline_name: str
    fleet_name: str
    rows: list[Row] = field(default_factory=list)
    reps: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
