"""Thin DVC stage entry points: parse config, call the library."""
