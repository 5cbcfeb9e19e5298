"""Data: raw sources, preparation, Parquet shards with manifests, and the resumable reader."""
