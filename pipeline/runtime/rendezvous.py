"""How the training workers of one fit find each other (the torch process group's store).

On a cluster, Ray Train's own rendezvous: rank 0 serves a `TCPStore` at its node's address, and
every rank connects to it. That store's server listens on all interfaces (torch offers no bind
address), which on the embedded local Ray would be the one socket of a fit reachable from
outside the machine. The local Ray is one node by definition, so there the ranks meet through a
`FileStore` in a private temporary folder instead: no socket at all, and nothing a second
pipeline on the same host could join. Gloo's own connections between ranks stay on loopback
(tests/test_loopback.py lists every listening socket during a fit).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from ray.train.torch import TorchConfig

# Ray Train's building blocks for the process group (private, stable since Ray 2.9): the backend
# we extend and the two functions it runs on every worker.
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend


class _FileStoreBackend(_TorchBackend):
    """`_TorchBackend` with a `file://` rendezvous; shutdown and the rest are Ray's."""

    def on_start(self, worker_group: Any, backend_config: FileStoreTorchConfig) -> None:
        import ray

        folder = Path(tempfile.mkdtemp(prefix="pipeline-rendezvous-"))
        folder.chmod(0o700)
        self._folder = folder
        url = f"file://{folder / 'store'}"
        worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK, WORLD_SIZE, ...
        ray.get([worker_group.execute_single_async(rank, _setup_torch_process_group, backend=backend_config.backend,
                                                   world_rank=rank, world_size=len(worker_group), init_method=url,
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group: Any, backend_config: FileStoreTorchConfig) -> None:
        try:
            super().on_shutdown(worker_group, backend_config)
        finally:
            if folder := getattr(self, "_folder", None):
                shutil.rmtree(folder, ignore_errors=True)


class FileStoreTorchConfig(TorchConfig):
    """A `TorchConfig` whose workers meet through a file (one node only)."""

    @property
    def backend_cls(self) -> type[_TorchBackend]:
        return _FileStoreBackend


def gloo_on_node_ip() -> None:
    """Point gloo at the network interface that holds this node's Ray address (GLOO_SOCKET_IFNAME),
    unless the user named one. Left alone, gloo binds the address the machine's hostname resolves
    to, and where that is loopback (a common /etc/hosts, and every host of the namespace test
    cluster) each rank offers its peers 127.0.0.1: the process group then fails to form across
    hosts ("Gloo connectFullMesh failed ... remote=[127.0.0.1]")."""
    import os

    import psutil
    import ray

    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    ip = ray.util.get_node_ip_address()
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addrs):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return


class _ClusterBackend(_TorchBackend):
    """Ray Train's TCP rendezvous, with gloo on each node's Ray address."""

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        worker_group.execute(gloo_on_node_ip)
        super().on_start(worker_group, backend_config)


class ClusterTorchConfig(TorchConfig):
    """A `TorchConfig` for several nodes: gloo binds the interface of each node's Ray address."""

    @property
    def backend_cls(self) -> type[_TorchBackend]:
        return _ClusterBackend


def torch_config(backend: str, single_node: bool) -> TorchConfig:
    """The process-group settings for a fit: a socket-free rendezvous on the embedded local Ray
    (`single_node`), Ray Train's TCP one on a cluster (gloo on each node's Ray address)."""
    return FileStoreTorchConfig(backend=backend) if single_node else ClusterTorchConfig(backend=backend)
