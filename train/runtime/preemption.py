"""Stop requests from outside: SIGTERM (preemption, `scancel`), a warning signal, or a stop file (what
scripts/launch/slurm.sbatch writes on SLURM's ``--signal=B:USR1@120``) make the run finish its optimizer
step, save a complete checkpoint and exit 0.

The handler only records the signal (nothing else is safe inside a signal handler); the loop reads it
at each step boundary through the step's metrics all-reduce, so one rank's signal stops every rank
after the same step, with no extra collective and no rank left waiting for a peer that left.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any


def signal_number(name: str) -> int:
    """``"SIGUSR1"`` / ``"USR1"`` / ``"10"`` -> its number; an unknown name is refused with the choices."""
    if name.isdigit():
        return int(name)
    full = name if name.startswith("SIG") else f"SIG{name}"
    if not hasattr(signal.Signals, full):
        known = ", ".join(s.name for s in signal.Signals)
        raise ValueError(f"train.stop_signals: unknown signal {name!r} (known: {known})")
    return int(signal.Signals[full])


class StopRequest:
    """Installs handlers for ``names`` that record the first signal received, and watches ``stop_file``
    (checked by the caller's rank, rank 0, at each step boundary: one stat). ``restore()`` puts the
    previous handlers back (a run in a long-lived process, e.g. a test, leaves no handler behind)."""

    def __init__(self, names: Sequence[str], stop_file: str | Path | None = None) -> None:
        self.received: int | None = None
        self.stop_file = Path(stop_file) if stop_file else None
        self._previous: dict[int, Any] = {}
        for number in {signal_number(n) for n in names}:
            self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def requested(self, watch_file: bool) -> bool:
        """A signal arrived here, or (``watch_file``: one rank looks, the others hear it through the
        all-reduce) the stop file exists."""
        return self.received is not None or (
            watch_file and self.stop_file is not None and self.stop_file.exists()
        )

    def reason(self) -> str:
        if self.received is not None:
            return signal.Signals(self.received).name
        if self.stop_file is not None and self.stop_file.exists():
            return f"stop file {self.stop_file}"
        return "another rank's request"

    def acknowledge(self, step: int) -> None:
        """Tell the launcher the run stopped early (it requeues only then): the stop file says so."""
        if self.stop_file is not None:
            self.stop_file.write_text(f"stopped at step {step}\n")

    def clear_stale(self) -> bool:
        """A stop file left by the previous, stopped attempt of this run is not a request to this one."""
        if self.stop_file is not None and self.stop_file.exists():
            if self.stop_file.read_text().startswith("stopped"):
                self.stop_file.unlink()
                return True
        return False

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
