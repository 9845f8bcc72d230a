"""Model selection and early stopping over the evaluations of a run.

Selection is on the **validation** split: the best epoch is the one with the highest
``metric`` on validation (the earliest on ties); the test metrics reported for the run are
those measured at that epoch. The authors' protocol (best *test* epoch) is kept apart as
``reference_best``. The history is plain data so that a checkpoint can store it as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalHistory:
    metric: str
    """Selection metric, e.g. ``recall@10``."""
    patience: int = 0
    """Stop after this many evaluations without a validation improvement (0 = never)."""
    rows: list[dict] = field(default_factory=list)
    """One row per evaluation: ``{"epoch", "valid": {...}, "test": {...}}``."""
    bad: int = 0
    """Evaluations since the last improvement."""

    def add(self, epoch: int, valid: dict[str, float], test: dict[str, float]) -> bool:
        """Record one evaluation; True when it improves on the best validation metric so far."""
        best = self.best
        improved = best is None or valid[self.metric] > best["valid"][self.metric]
        self.rows.append({"epoch": int(epoch), "valid": dict(valid), "test": dict(test)})
        self.bad = 0 if improved else self.bad + 1
        return improved

    @property
    def best(self) -> dict | None:
        """The row selected on validation (earliest epoch among equal scores)."""
        return max(self.rows, key=lambda r: (r["valid"][self.metric], -r["epoch"])) if self.rows else None

    @property
    def reference_best(self) -> dict | None:
        """The row with the best *test* metric: the authors' protocol, reported under that name only."""
        return max(self.rows, key=lambda r: (r["test"][self.metric], -r["epoch"])) if self.rows else None

    def should_stop(self) -> bool:
        return bool(self.patience) and self.bad >= self.patience

    def state_dict(self) -> dict:
        return {"metric": self.metric, "patience": self.patience, "rows": self.rows, "bad": self.bad}

    def load_state_dict(self, sd: dict) -> None:
        if sd["metric"] != self.metric:
            raise ValueError(f"history selects on {sd['metric']!r}, this run on {self.metric!r}")
        self.rows = [dict(r) for r in sd["rows"]]
        self.bad = int(sd["bad"])
