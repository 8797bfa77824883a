"""A JSON-lines log of training and evaluation metrics, optionally mirrored to TensorBoard."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from shitu.errors import ConfigError, DataError
from shitu.fileio import write_atomically

LOG_NAME = "metrics.jsonl"
logger = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON object per record to `output_dir/metrics.jsonl` (main process only).

    On resume, records from beyond the checkpoint's step (written by the interrupted
    run after its last checkpoint) are dropped, so the log reads as one clean run; in
    TensorBoard they are purged (hidden), as its own records after the resumed step would
    otherwise be drawn beside the resumed run's.
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
            write_atomically(self.path, lambda tmp: tmp.write_text(""))
        elif self.path.exists():
            kept = [
                json.dumps(record) + "\n"
                for record in _parse(self.path, repair=True)
                if record.get("step", 0) <= resume_step
            ]
            write_atomically(self.path, lambda tmp: tmp.write_text("".join(kept)))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "Global.use_tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            purge_step = None if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=purge_step)

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
    return [r for r in _parse(path, repair=False) if kind is None or r["kind"] == kind]


def _parse(path: Path, repair: bool) -> list[dict[str, Any]]:
    """The log's records. A run killed while appending leaves a torn last line: with
    `repair` (resuming) it is dropped with a warning; anything else unreadable is an error."""
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records: list[dict[str, Any]] = []
    for position, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if repair and position == len(lines) - 1:
                logger.warning("%s: dropping the unfinished last line %d (%s)", path, number, error)
                continue
            # Resuming: the log alone stood in the way, and the message said nothing of it.
            fix = "; put the line right or remove it, then resume again" if repair else ""
            raise DataError(f"{path}: line {number} is not a JSON record ({error}){fix}") from None
    return records
