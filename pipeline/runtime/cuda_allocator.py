"""The CUDA caching allocator's settings for a training process (`cluster.cuda_alloc_conf`).

Apart from the loop because it is process set-up, not training: it runs once per worker, on
whichever path started it (Ray Train, Horovod, or a test's in-process group). The environment
variable is read by torch only when the allocator is first used, which Ray Train's own set-up
(an NCCL barrier) may already have done; so the settings are also applied at run time through
torch's allocator-settings call, which takes effect for the memory the allocator maps from then
on, i.e. everything the model, optimizer and steps allocate.
"""

from __future__ import annotations

import os
from collections.abc import Callable

ENV = "PYTORCH_CUDA_ALLOC_CONF"


def _torch_setter() -> Callable[[str], object]:
    import torch

    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.9
    return setter if setter is not None else torch.cuda.memory._set_allocator_settings


def configure_cuda_allocator(conf: str, setter: Callable[[str], object] | None = None) -> str | None:
    """Apply `conf` (e.g. "expandable_segments:True") to this process's CUDA allocator and export
    it for the processes it starts (inductor's compile workers). A setting already in the
    environment is the user's and wins, unchanged. Returns the settings in effect, or None for
    torch's default. Call only where the process trains on a CUDA device."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    if not conf:
        return None
    os.environ[ENV] = conf
    (setter or _torch_setter())(conf)
    return conf
