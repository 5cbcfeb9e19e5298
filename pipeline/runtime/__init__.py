"""The Ray runtime: connecting to local Ray or a cluster, and running the loop on Ray Train."""

from pipeline.runtime.connect import cluster_address, connect

__all__ = ["cluster_address", "connect"]
