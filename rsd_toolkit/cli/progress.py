"""The one progress display of every long command (generate, sweep, surprisal, compare, eval, sft, demo).

* stderr is a terminal: a rich bar — what, bar, done/total, the command's statistics, tok/s, elapsed, ETA.
* stderr is a file or a pipe (nohup, a cluster scheduler, ``2> log``): plain timestamped lines such as
  ``12:03:41 generate  5/6 problems (83%) · solved 4 · 132 tok/s · proposals accepted 51.2% · elapsed 0:01:02
  · ETA 0:00:12``, one at the start, then at most one every ``RSD_PROGRESS_SECONDS`` seconds (default 10)
  when work finishes, a heartbeat line every ``RSD_PROGRESS_SECONDS`` while nothing finishes, and the last
  one at the end. ``RSD_PROGRESS_SECONDS=0`` prints a line for every finished item.

Rates keep three significant digits (``0.42 tok/s``, never ``0 tok/s``); a statistic that does not exist yet
(no proposal judged: teacher-only decoding) is left out rather than shown as ``nan%``.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .common import err_console

DEFAULT_SECONDS = 10.0


def interval() -> float:
    """Seconds between progress lines off a terminal (``RSD_PROGRESS_SECONDS``)."""
    try:
        value = float(os.environ.get("RSD_PROGRESS_SECONDS", DEFAULT_SECONDS))
    except ValueError:
        return DEFAULT_SECONDS
    return value if value >= 0 and value == value else DEFAULT_SECONDS


def rate(amount: float, seconds: float, unit: str = "tok/s") -> str:
    """``amount / seconds`` with three significant digits: 1530, 153, 15.3, 1.53, 0.153."""
    if seconds <= 0:
        return f"– {unit}"
    r = amount / seconds
    if r >= 100:
        return f"{r:,.0f} {unit}"
    return f"{r:.3g} {unit}"


def percent(x: float | None, digits: int = 1) -> str | None:
    """``51.2%``, or None for a statistic that does not exist (nothing to average)."""
    if x is None or x != x:
        return None
    return f"{100 * x:.{digits}f}%"


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(max(0, seconds))))


class Tracker:
    """``with Tracker("generate", total, "problems") as p: p.advance(1, tokens=n, info=["solved 3", …])``.

    ``tokens`` accumulate into the tok/s rate; ``info`` is a list of already formatted statistics (None
    entries are skipped); ``done`` starts at ``completed`` (resumed work, not counted in rates or the ETA).
    """

    def __init__(self, what: str, total: int | None, unit: str = "", *, completed: int = 0, console=None,
                 show_rate: bool = True) -> None:  # fmt: skip
        self.what, self.total, self.unit = what, total, unit
        self.done = self.start_done = completed
        self.tokens = 0
        self.info: list[str | None] = []
        self.show_rate = show_rate
        self.console = console or err_console
        self.live = self.console.is_terminal
        self.every = interval()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_line = 0.0
        self._bar: Progress | None = None
        self._printed: tuple | None = None

    def _state(self) -> tuple:
        return self.what, self.done, self.total, tuple(self.info), self.tokens

    # ------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Tracker":
        self.t0 = time.monotonic()
        if self.live:
            columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                       TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
            self._bar = Progress(*columns, console=self.console, transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=self.total, completed=self.done, info="")
        else:
            self._line()
            if self.every > 0:
                threading.Thread(target=self._heartbeat, daemon=True).start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        if self._bar is not None:
            self._refresh()
            self._bar.stop()
        elif exc[0] is None and self._printed != self._state():
            self._line()  # the final state, unless the last line already showed it
        return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(self.every, 1.0)):
            if time.monotonic() - self._last_line >= self.every:
                self._line()

    # --------------------------------------------------------------------------------------- updates
    def advance(self, n: int = 1, *, tokens: int = 0, info: list[str | None] | None = None) -> None:
        with self._lock:
            self.done += n
            self.tokens += tokens
            if info is not None:
                self.info = info
        if self._bar is not None:
            self._refresh()
        elif time.monotonic() - self._last_line >= self.every:
            self._line()

    def update(self, *, what: str | None = None, total: int | None = None, done: int | None = None,
               info: list[str | None] | None = None) -> None:  # fmt: skip
        with self._lock:
            self.what = what if what is not None else self.what
            self.total = total if total is not None else self.total
            self.done = done if done is not None else self.done
            self.info = info if info is not None else self.info
        if self._bar is not None:
            self._refresh()

    def _stats(self) -> list[str]:
        parts = [p for p in self.info if p]
        if self.show_rate and self.tokens:
            parts.append(rate(self.tokens, time.monotonic() - self.t0))
        return parts

    def _refresh(self) -> None:
        self._bar.update(self._task, description=self.what, total=self.total, completed=self.done,
                         info=" · ".join(self._stats()))  # fmt: skip

    def _line(self) -> None:
        with self._lock:
            now = time.monotonic()
            self._last_line = now
            self._printed = self._state()
            elapsed = now - self.t0
            count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
            count += f" {self.unit}" if self.unit else ""
            if self.total:
                count += f" ({self.done / self.total:.0%})"
            parts = [f"{time.strftime('%H:%M:%S')} {self.what}  {count}", *self._stats(), f"elapsed {_clock(elapsed)}"]
            new = self.done - self.start_done
            if self.total is not None and 0 < new and self.done < self.total:
                parts.append(f"ETA {_clock(elapsed / new * (self.total - self.done))}")
            self.console.print(" · ".join(parts), markup=False, highlight=False, soft_wrap=True)


def trainer_callback(what: str = "sft"):
    """A transformers ``TrainerCallback`` showing optimizer steps, loss and learning rate through a Tracker
    (it replaces Trainer's own tqdm bar and its raw ``{'loss': …}`` dicts)."""
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        replaces_trainer_output = True  # sft.train removes Trainer's printer callbacks when it sees this

        def __init__(self) -> None:
            self.tracker: Tracker | None = None
            self.stats: dict[str, str] = {}

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.tracker = Tracker(what, state.max_steps, "steps", completed=state.global_step, show_rate=False).__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self.tracker is not None:
                self.tracker.update(done=state.global_step, info=list(self.stats.values()))
                self.tracker.advance(0)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" in logs:
                self.stats["loss"] = f"loss {float(logs['loss']):.4g}"
            if "learning_rate" in logs:
                self.stats["lr"] = f"lr {float(logs['learning_rate']):.2e}"
            if "epoch" in logs:
                self.stats["epoch"] = f"epoch {float(logs['epoch']):.2f}"
            if self.tracker is not None:
                self.tracker.update(info=list(self.stats.values()))

        def on_train_end(self, args, state, control, **kw):
            if self.tracker is not None:
                self.tracker.update(done=state.global_step)
                self.tracker.__exit__(None, None, None)
                self.tracker = None

    return RichProgress()
