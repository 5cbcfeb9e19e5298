"""The weights of the best validation so far (`trainer.export_weights: best`).

Early stopping ends a run `early_stop_patience` validations after its best one, so the last
weights are by construction not the best; a run that overfits or diverges late is the same.
When a validation improves on every earlier one, all ranks gather the export weights (the
model's, or the EMA's) one tensor at a time and rank 0 streams them into a private file, as the
final checkpoint's weights are written (`write_weights`): the whole model is never in one
process. Every later checkpoint carries that file (a hard link where the file system allows),
so a run resumed on other hosts, or on another number of workers, still hands on the weights of
its best step; the final checkpoint holds them as its `model.safetensors`. The checkpoint's
`meta.json` says which step they are from (`best_weights_step`, `weights_step`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.training.checkpoint import WEIGHTS, write_weights

if TYPE_CHECKING:
    from pipeline.distributed.base import Strategy
    from pipeline.training.ema import EMA

BEST = "best-weights.safetensors"  # in a checkpoint that is not the final one


class BestWeights:
    """Rank 0's file of the best step's weights, and (on every rank) the step they are from."""

    def __init__(self, rank: int) -> None:
        self.step: int | None = None  # None: no weights kept yet
        self._dir = Path(tempfile.mkdtemp(prefix="best-weights-")) if rank == 0 else None
        if self._dir is not None:  # gone with this object, or at exit: however the loop ends
            weakref.finalize(self, shutil.rmtree, self._dir, True)

    @property
    def path(self) -> Path | None:
        """The file, on rank 0 once weights were kept."""
        return None if self._dir is None or self.step is None else self._dir / WEIGHTS

    def keep(self, strategy: Strategy, ema: EMA | None, step: int) -> None:
        """Every rank, after a validation that improved: the weights as they are now (a
        collective: every rank joins the gathers)."""
        write_weights(self._dir, strategy, ema.weights() if ema is not None else None)
        self.step = step

    def restore(self, checkpoint: Path, meta: dict[str, Any]) -> None:
        """Every rank, when resuming: the kept weights of `checkpoint`, if it carries any (in a
        final checkpoint they are its `model.safetensors`)."""
        step = meta.get("best_weights_step")
        if step is None:
            return
        if self._dir is not None:
            source = checkpoint / (WEIGHTS if meta.get("final") else BEST)
            shutil.copyfile(source, self._dir / WEIGHTS)
        self.step = step

    def add_to(self, checkpoint: Path, final: bool) -> None:
        """Rank 0: put the kept weights into a checkpoint being written (as its export weights
        when `final`)."""
        if self.path is None:
            return
        target = checkpoint / (WEIGHTS if final else BEST)
        try:
            os.link(self.path, target)  # no copy: the file is never written in place again (see `keep`)
        except OSError:
            shutil.copyfile(self.path, target)
