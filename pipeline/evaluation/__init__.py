"""Evaluation of trained models on held-out shards."""
