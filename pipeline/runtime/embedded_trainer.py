"""Ray Train's TorchTrainer without the parts a one-node embedded Ray never uses.

Each `fit()` on Ray Train 2.60 starts, besides the controller and the workers, a Ray Data
`DatasetManager` actor (even when no dataset is passed) and Ray Data's autoscaling coordinator,
which the controller then waits on (a blocking `ray.get`, up to 5 s) to ask an autoscaler for
the workers' CPUs. The embedded Ray (`connect()` without a cluster address) has no autoscaler,
and this pipeline reads its own shards, so both are new Python processes that import Ray Data
for nothing: on a 2-core machine they cost about 5 s of every fit (measured side by side with a
trivial training function, 14-20 s against 20-26 s from `fit()` to the first line of training).

Two more per-fit processes go too. Ray Train's placement-group cleaner (a detached actor polling
the State API every second) frees a dead controller's workers' reservation while the cluster
lives on; the embedded Ray lives only as long as its driver, and between two fits in one driver
`remove_leftover_placement_groups` frees what a dead controller left. Ray Train's Prometheus
metrics callbacks feed a Prometheus the embedded Ray does not have.

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
    from ray.train.v2._internal.callbacks.metrics import ControllerMetricsCallback, WorkerMetricsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
except ImportError:  # a Ray release that moved them: the stock trainer
    DatasetsCallback = FixedScalingPolicy = None

_NOT_ON_ONE_NODE = () if FixedScalingPolicy is None else \
    (PlacementGroupCleanerCallback, ControllerMetricsCallback, WorkerMetricsCallback)


def lean_trainer_applies() -> bool:
    """Whether this Ray release has the hooks `EmbeddedTorchTrainer` overrides (else the embedded
    Ray runs Ray Train's own TorchTrainer, whose placement-group cleaner needs the dashboard)."""
    hooks = ("_create_default_callbacks", "_initialize_and_run_controller")
    return FixedScalingPolicy is not None and all(hasattr(TorchTrainer, name) for name in hooks)


def embedded_trainer_class() -> type:
    """`EmbeddedTorchTrainer`, or TorchTrainer itself when this Ray release does not have the
    hooks it overrides."""
    return EmbeddedTorchTrainer if lean_trainer_applies() else TorchTrainer


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
        """TorchTrainer with no DatasetManager (when no dataset is passed), no resource requests,
        no placement-group cleaner and no Prometheus metrics."""

        def _create_default_callbacks(self) -> list:
            dropped = _NOT_ON_ONE_NODE if self.datasets else (*_NOT_ON_ONE_NODE, DatasetsCallback)
            return [c for c in super()._create_default_callbacks() if not isinstance(c, dropped)]

        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            if type(kwargs.get("scaling_policy")) is FixedScalingPolicy:
                kwargs["scaling_policy"] = _NoAutoscalerPolicy(self.scaling_config)
            return super()._initialize_and_run_controller(**kwargs)


def remove_leftover_placement_groups() -> int:
    """Free the placement groups still reserved on the embedded Ray before a fit starts: between
    two fits there should be none, so any left belongs to a controller that died (without Ray
    Train's cleaner nothing else frees them, and the next fit would wait for their CPUs forever).
    Returns how many were removed."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    left = [pg_id for pg_id, info in placement_group_table().items() if info.get("state") != "REMOVED"]
    for pg_id in left:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    return len(left)
