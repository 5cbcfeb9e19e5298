"""Ray Train's TorchTrainer without the parts a one-node embedded Ray never uses.

Each `fit()` on Ray Train 2.60 starts, besides the controller and the workers, a Ray Data
`DatasetManager` actor (even when no dataset is passed) and Ray Data's autoscaling coordinator,
which the controller then waits on (a blocking `ray.get`, up to 5 s) to ask an autoscaler for
the workers' CPUs. The embedded Ray (`connect()` without a cluster address) has no autoscaler,
and this pipeline reads its own shards, so both are new Python processes that import Ray Data
for nothing: on a 2-core machine they cost about 5 s of every fit (measured side by side with a
trivial training function, 14-20 s against 20-26 s from `fit()` to the first line of training).

Only the embedded Ray gets this class; clusters keep Ray's own behaviour (an autoscaler may
need the request). It leans on two private hooks of Ray Train V2 (`_create_default_callbacks`,
`_initialize_and_run_controller`); when a Ray release moves them, `embedded_trainer_class`
falls back to the stock TorchTrainer, which only costs the seconds back.
"""

from __future__ import annotations

from typing import Any

from ray.train.torch import TorchTrainer

try:
    from ray.train.v2._internal.callbacks import DatasetsCallback
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
except ImportError:  # a Ray release that moved them: the stock trainer
    DatasetsCallback = FixedScalingPolicy = None


def embedded_trainer_class() -> type:
    """`EmbeddedTorchTrainer`, or TorchTrainer itself when this Ray release does not have the
    hooks it overrides."""
    hooks = ("_create_default_callbacks", "_initialize_and_run_controller")
    if FixedScalingPolicy is None or not all(hasattr(TorchTrainer, name) for name in hooks):
        return TorchTrainer
    return EmbeddedTorchTrainer


if FixedScalingPolicy is not None:
    class _NoAutoscalerPolicy(FixedScalingPolicy):
        """A fixed worker count with no resource requests: one node, no autoscaler to ask."""

        def after_controller_start(self, train_run_context: Any) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass

        def _send_resource_request(self) -> None:
            pass

        def _cancel_resource_request(self) -> None:
            pass

    class EmbeddedTorchTrainer(TorchTrainer):
        """TorchTrainer with no DatasetManager (when no dataset is passed) and no resource requests."""

        def _create_default_callbacks(self) -> list:
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            if type(kwargs.get("scaling_policy")) is FixedScalingPolicy:
                kwargs["scaling_policy"] = _NoAutoscalerPolicy(self.scaling_config)
            return super()._initialize_and_run_controller(**kwargs)
