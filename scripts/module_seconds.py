"""Seconds per test module from a pytest JUnit report, as tests/module_seconds.json.

`make test-timings` runs the suite with `--junitxml` and writes the result; tests/conftest.py
orders modules by it, longest first, so the two CI workers finish together."""

from __future__ import annotations

import datetime
import json
import platform
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict


def module_seconds(junit_xml: str) -> dict[str, float]:
    """Each module's total time (setup, call and teardown of its tests: pytest's junit default)."""
    totals: dict[str, float] = defaultdict(float)
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        # a class's tests are named module.Class: the module is the longest prefix that is a file
        parts = module.split("/")
        path = next(("/".join(parts[:n]) + ".py" for n in range(len(parts), 0, -1)
                     if parts[n - 1].startswith("test_")), module + ".py")
        totals[path] += float(case.get("time", 0.0))
    return dict(sorted(((k, round(v, 1)) for k, v in totals.items()), key=lambda kv: -kv[1]))


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/module_seconds.py REPORT.xml > tests/module_seconds.json")
    seconds = module_seconds(sys.argv[1])
    record = {"measured": f"{datetime.date.today()} on {platform.node() or 'unknown'} "
                          f"({sum(seconds.values()):.0f} s in all, `make test-timings`)",
              "modules": seconds}
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
