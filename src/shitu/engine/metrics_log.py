"""A JSON-lines log of training and evaluation metrics, optionally mirrored to TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from shitu.errors import ConfigError

LOG_NAME = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON object per record to `output_dir/metrics.jsonl` (main process only).

    On resume, records from beyond the checkpoint's step (written by the interrupted
    run after its last checkpoint) are dropped, so the log reads as one clean run.
    """

    def __init__(
        self,
        output_dir: Path,
        enabled: bool = True,
        resume_step: int | None = None,
        tensorboard: bool = False,
    ) -> None:
        self.path = output_dir / LOG_NAME
        self.enabled = enabled
        self._writer: Any = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "Global.use_tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            self._writer = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_log(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]
