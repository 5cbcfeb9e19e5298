"""Drop two harmless warnings torchao logs on import, whoever imports it.

torchao is imported by `transformers` whenever one of its models loads (its quantizers check for
it; the HF export's check does this), and by our own fp8 path. Each import logs:
- on a CPU-only torch build, "Failed to load .../torchao/_C_*.so" for each of torchao's CUDA
  kernel libraries, kernels that cannot run there anyway (on a CUDA build this is a real problem
  and stays reported);
- from torch's pytree, that registering torchao's Enums is deprecated (torchao's business, not
  the user's).
Both would land in every stage's output. Only these records are dropped: each filter sits on
the one logger that emits them and matches their text.
"""

from __future__ import annotations

import logging
import re
import sys

# torchao/__init__.py: logger.warning(f"Failed to load {file}: {e}") for each torchao/_C*.so
_KERNEL_LIBRARY = re.compile(r"Failed to load \S*torchao[/\\]_C[^/\\]*\.so: ")
# torch/utils/_pytree.py: log.warning("%s is an Enum subclass and is now natively supported ...", cls)
_ENUM_DEPRECATION = "is an Enum subclass and is now natively supported by torch.compile"


def _cpu_only_torch() -> bool:
    """Whether the torch in use has no CUDA (it is imported by the time torchao logs)."""
    torch = sys.modules.get("torch")
    return torch is not None and getattr(torch.version, "cuda", None) is None


class _TorchaoKernelLibraries(logging.Filter):
    """On logger "torchao": its CUDA kernel libraries that fail to load on a CPU-only build."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_KERNEL_LIBRARY.match(record.getMessage()) and _cpu_only_torch())


class _TorchaoEnumRegistration(logging.Filter):
    """On logger "torch.utils._pytree": the Enum deprecation, for torchao's Enums only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _ENUM_DEPRECATION not in str(record.msg):
            return True
        cls = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not str(getattr(cls, "__module__", "")).startswith("torchao")


_FILTERS = {"torchao": _TorchaoKernelLibraries(), "torch.utils._pytree": _TorchaoEnumRegistration()}


def quiet_torchao_import() -> None:
    """Install the two filters (idempotent; needs no torch import, so it is cheap at start)."""
    for name, flt in _FILTERS.items():
        logger = logging.getLogger(name)
        if flt not in logger.filters:
            logger.addFilter(flt)


# ray/train/v2/_internal/callbacks/backend_setup.py: when a worker is gone, Ray Train's controller
# logs its failed backend shutdown with the whole traceback of the dead actor's RPC (about 23 lines);
# the driver already says which worker died and that it restarts (pipeline/runtime/failures.py).
_BACKEND_SHUTDOWN = "Graceful shutdown of backend failed"
_WORKER_GONE = ("ActorDiedError", "ActorUnavailableError", "RayActorError", "ActorUnschedulableError")


class _WorkerGoneShutdown(logging.Filter):
    """On Ray Train's backend-setup logger: the failed shutdown of a group whose worker is gone.
    Any other shutdown failure (a worker's own error in its shutdown hook) stays logged whole."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_BACKEND_SHUTDOWN) or not record.exc_info:
            return True
        return type(record.exc_info[1]).__name__ not in _WORKER_GONE


RAY_WORKER_SETUP = "pipeline.quiet.quiet_ray_worker"  # runtime_env's worker_process_setup_hook


def quiet_ray_worker() -> None:
    """Run in every process of a Ray job this project starts (`RAY_WORKER_SETUP`, set by
    pipeline/runtime/connect.py), Ray Train's controller included, where the record above is
    logged. PIPELINE_DEBUG=1 keeps everything. Imports nothing beyond `logging`: every worker
    process of the job runs it at start."""
    import os

    if os.environ.get("PIPELINE_DEBUG"):
        return
    logger = logging.getLogger("ray.train.v2._internal.callbacks.backend_setup")
    if not any(isinstance(f, _WorkerGoneShutdown) for f in logger.filters):
        logger.addFilter(_WorkerGoneShutdown())
