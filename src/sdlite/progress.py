"""The progress line every ``sdlite`` command draws on stderr: a bar, the step, optional extra text (a training
run's loss), the rate and the time left, redrawn in place."""

from __future__ import annotations

import sys


class ProgressLine:
    """``line.draw(done, total, elapsed, counted=None, extra="")``: ``counted`` is how many of the ``done`` steps the
    rate is measured over (a resumed run's earlier steps took no time in this process)."""

    def __init__(self, stream=None, width: int = 30):
        self.stream, self.width = stream, width

    def draw(self, done: int, total: int, elapsed: float, counted: int | None = None, extra: str = "") -> None:
        rate = (done if counted is None else counted) / max(elapsed, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        filled = int(self.width * done / total)
        bar = "#" * filled + "-" * (self.width - filled)
        stream = self.stream or sys.stderr
        stream.write(f"\r[{bar}] {done}/{total} {extra}{rate:5.2f} it/s ETA {eta:5.1f}s")
        if done >= total:
            stream.write("\n")
        stream.flush()
