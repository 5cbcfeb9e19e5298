"""`scripts/netns_cluster.py` as a module for the tests (it is a script, not part of the package),
and whether this machine can build its hosts. Where it can, the multi-host tests run some of the
chains that the single-host tests run otherwise (see `covered_across_hosts`)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("netns_cluster", ROOT / "scripts" / "netns_cluster.py")
netns = importlib.util.module_from_spec(_spec)
sys.modules["netns_cluster"] = netns  # dataclasses look their module up by name
_spec.loader.exec_module(netns)

UNAVAILABLE = netns.available()  # None where root and `ip netns` are there


def covered_across_hosts(test: str) -> pytest.MarkDecorator:
    """Skip a single-host test where `test` (in tests/test_multi_host.py) runs the same path
    across namespace hosts, so CI runs that path once; elsewhere it runs here."""
    return pytest.mark.skipif(UNAVAILABLE is None, reason=f"runs across namespace hosts in test_multi_host.py::{test}")
