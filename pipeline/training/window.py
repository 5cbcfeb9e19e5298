"""The training loop's log window, kept on the device.

Reading a value back from a GPU (`.item()`, `float(t)`, `bool(t)`) makes the host wait until
the device has finished everything queued before it, so the host can no longer run ahead and
queue the next step while this one computes. The loop therefore adds each step's loss, gradient
norm and "stepped" flag into device tensors here and reads them once per report (`log_every`,
a checkpoint or a validation): one read of a few numbers instead of several per step.

What it keeps is exactly what the loop logged when it read every step: the sum and count of
the losses of the steps that stepped with a finite loss (summed in float64, in step order,
as Python floats were), the last such step's gradient norm, the steps skipped, and the run of
non-finite steps in a row, with the step, loss and norm at which the run first reached
`trainer.max_nonfinite_in_a_row`. Skipped steps change no weights, so learning that limit at
the next report instead of at once loses nothing but those steps' time.

A window in which every step was skipped has no loss and no gradient norm: it reads NaN for
both, never 0.0 (a zero loss made a diverging run look perfect in the console, the history,
MLflow and train.json; NaN is dropped from the plots and shows as NaN everywhere else).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class WindowValues:
    """One read of the window (host values)."""

    loss_mean: float  # over the window's good steps (NaN when none: there is no loss to show)
    good_steps: int
    last_norm: float  # of the window's last good step (NaN when none: an older one would look current)
    skipped: int  # in this window
    in_a_row: int  # non-finite steps in a row up to now
    limit_step: int  # the step at which the run reached the limit (0: not reached)
    limit_loss: float
    limit_norm: float


class StepWindow:
    def __init__(self, device: torch.device, limit: int, in_a_row: int = 0) -> None:
        """`in_a_row`: the non-finite steps in a row the run ended its last checkpoint with (a
        resumed run goes on counting them, as the uninterrupted run does)."""
        self.limit = limit
        self.device = device
        # 0 loss sum, 1 good steps, 2 last good norm, 3 skipped, 4 in a row, 5-7 limit step/loss/norm
        self._t = torch.zeros(8, dtype=torch.float64, device=device)
        self._t[4] = in_a_row

    def add(self, loss: torch.Tensor | float, norm: torch.Tensor | float, stepped: torch.Tensor | bool,
            step: int) -> None:
        """Account for step `step` (1-based) without reading anything back."""
        loss_t = _scalar(loss, self.device)
        norm_t = _scalar(norm, self.device)
        ok = torch.isfinite(loss_t) & (stepped.to(self.device).reshape(()) if isinstance(stepped, torch.Tensor)
                                       else stepped)
        t = self._t
        run = torch.where(ok, 0.0, t[4] + 1)
        reached = (run >= self.limit) & (t[5] == 0)
        self._t = torch.stack([
            t[0] + torch.where(ok, loss_t, 0.0),
            t[1] + ok.to(torch.float64),
            torch.where(ok, norm_t, t[2]),
            t[3] + (~ok).to(torch.float64),
            run,
            torch.where(reached, float(step), t[5]),
            torch.where(reached, loss_t, t[6]),
            torch.where(reached, norm_t, t[7]),
        ])

    def read(self) -> WindowValues:
        """The one read back of the window; then start the next window (the run in a row and
        the limit carry over: they count across windows). With no good step in the window its
        loss and norm are NaN, so that nobody mistakes an all-skipped window for a perfect one."""
        v = self._t.tolist()
        zero = self._t.new_zeros(())
        self._t = torch.stack([zero, zero, zero, zero, *self._t[4:]])
        good = int(v[1])
        loss, norm = (v[0] / good, v[2]) if good else (math.nan, math.nan)
        return WindowValues(loss, good, norm, int(v[3]), int(v[4]), int(v[5]), v[6], v[7])


def _scalar(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A 0-dim float64 tensor on `device` (Python numbers are filled in, not copied: no sync)."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).to(device=device, dtype=torch.float64, non_blocking=True)
    return torch.full((), float(value), dtype=torch.float64, device=device)
