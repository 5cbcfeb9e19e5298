"""Data: raw sources, preparation, Arrow IPC shards with manifests, and the resumable reader."""
