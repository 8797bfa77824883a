"""The progress bar that embedding image files (and hashing them, for a gallery) draws on
stderr."""

from __future__ import annotations

from tqdm import tqdm


class ImageProgress(tqdm):
    """Images done (embedded or skipped as unreadable), with the count skipped. One bar
    may follow several `extract_files` calls: an `index add` that commits in parts shows
    one bar over the whole add, not one per part."""

    def __init__(self, total: int, enabled: bool, description: str | None = None) -> None:
        super().__init__(
            total=total, desc=description, unit="img", disable=not enabled, dynamic_ncols=True
        )
        self.skipped = 0

    def skip(self) -> None:
        """One image could not be read: done, and counted as skipped."""
        self.skipped += 1
        self.update(1)
        self.set_postfix(skipped=self.skipped)
