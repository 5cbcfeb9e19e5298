"""The plots a newcomer opens: `reports/<task>/loss.png` drawn from the training history, and the
page `dvc plots show` writes, which must draw every plot with no network (vega, vega-lite and
vega-embed are inlined into the page template by scripts/offline_plots.py at setup)."""

from __future__ import annotations

import csv
import html
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.tracking.plots import write_loss_plot
from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
C0, C1, C2 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)  # matplotlib's first three colours


def _history(steps: int = 60) -> list[dict[str, float]]:
    """Rows as the loop records them: validation loss on every 10th logged step only."""
    rows = []
    for s in range(2, 2 * steps + 1, 2):
        row = {"step": s, "loss": 4 * math.exp(-s / 40) + 1.5, "lr": 1e-3 * min(1.0, s / 20), "grad_norm": 1.0,
               "tokens_per_s": 1000.0}
        if s % 20 == 0:
            row["val_loss"] = 4 * math.exp(-s / 40) + 1.8
        rows.append(row)
    return rows


def _near_mask(pixels: np.ndarray, colour: tuple[int, int, int], tol: int = 40) -> np.ndarray:
    """Which pixels of an RGB array are within `tol` of `colour` in every channel."""
    return (np.abs(pixels.astype(int) - colour) <= tol).all(axis=-1)


def _near(pixels: np.ndarray, colour: tuple[int, int, int], tol: int = 40) -> int:
    return int(_near_mask(pixels, colour, tol).sum())


def _ink(pixels: np.ndarray) -> int:
    """How many pixels are not white or near-white."""
    return int((pixels.min(axis=-1) < 200).sum())


def _coloured(pixels: np.ndarray) -> int:
    """How many pixels have a colour (curves), not a grey (axes, grid lines, text)."""
    return int((pixels.max(axis=-1).astype(int) - pixels.min(axis=-1) > 80).sum())


def test_loss_plot_is_a_png_with_both_curves_and_the_lr(tmp_path):
    from PIL import Image

    # read back from the CSV the train stage writes (strings; empty val_loss cells), as a user would
    path = tmp_path / "train_history.csv"
    fields = list(dict.fromkeys(k for r in _history() for k in r))
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(_history())
    with path.open() as fh:
        history = list(csv.DictReader(fh))
    out = write_loss_plot(history, tmp_path / "reports" / "lm" / "loss.png", "lm: gpt_tiny, ddp, 120 steps")
    assert sorted(p.name for p in out.parent.iterdir()) == ["loss.png"]  # written atomically: no temporary left
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (700, 500)
        pixels = np.asarray(img.convert("RGB"))
    assert _ink(pixels) > 5000  # not blank
    assert _near(pixels, C0) > 300 and _near(pixels, C1) > 50 and _near(pixels, C2) > 200  # train, val, lr
    with pytest.raises(ValueError, match="no finite loss"):
        write_loss_plot([{"step": 1, "loss": float("nan")}], tmp_path / "x.png")


def test_loss_plot_marks_the_step_whose_weights_go_on(tmp_path):
    """`trainer.export_weights: best`: a dashed line in C3 (red) at the handed-on step, in the
    loss panel; none when the last step's weights go on."""
    from PIL import Image

    C3 = (0xD6, 0x27, 0x28)
    images = {}
    for name, step in (("plain", None), ("marked", 40)):
        with Image.open(write_loss_plot(_history(), tmp_path / f"{name}.png", "lm", step)) as img:
            images[name] = np.asarray(img.convert("RGB"))
    assert _near(images["plain"], C3) < 20
    red = _near(images["marked"], C3)
    assert red > 150  # the line (and its legend entry)
    columns = np.nonzero(_near_mask(images["marked"], C3).sum(axis=0) > 100)[0]
    assert len(columns) >= 1  # one tall vertical line ...
    train_x = np.nonzero(_near_mask(images["marked"], C0).any(axis=0))[0]
    at = (columns.mean() - train_x.min()) / (train_x.max() - train_x.min())  # ... at step 40 of 2..120
    assert abs(at - (40 - 2) / (120 - 2)) < 0.03


FALLBACK_MARK = "offline-plots: fallback"  # scripts/offline_plots.py's first line when npm could not help


def test_offline_plots_setup_falls_back_without_npm(tmp_path):
    """Without npm (or its registry) setup says so and writes DVC's own page (CDN scripts), exit 0."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no npm there
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "offline_plots.py"), "--out",
                           str(tmp_path / "t.html")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: could not bundle vega@" in proc.stderr and "npm is not installed" in proc.stderr
    text = (tmp_path / "t.html").read_text()
    assert text.startswith(f"<!-- {FALLBACK_MARK}: npm is not installed -->")
    assert "{plot_divs}" in text and "{scripts}" in text  # DVC's default page


def _template() -> Path:
    local = ROOT / ".dvc" / "config.local"
    assert local.is_file(), f"{local} is missing: `make setup` writes it (with the template)"
    found = re.search(r"^\s*html_template\s*=\s*(\S+)", local.read_text(), re.MULTILINE)
    assert found, ".dvc/config.local names no plots.html_template"
    return Path(found.group(1))


def _chromium(url: str, profile: Path, *extra: str) -> str:
    """Headless Chromium with every network route closed: names do not resolve, and anything
    else would go to a proxy that is not there."""
    proc = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND",
                           "--proxy-server=http://127.0.0.1:9", "--force-device-scale-factor=1", "--hide-scrollbars",
                           "--virtual-time-budget=15000", *extra, url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# Appended to a copy of the page: once it has loaded, list each plot's div, what vega drew in
# it (its `.marks` canvas or svg) or how wide its images decoded, and where it sits on the page.
PROBE = """<script>
window.addEventListener("load", function () { setTimeout(function () {
  var plots = [];
  document.querySelectorAll("body > div[id]").forEach(function (div) {
    var marks = div.querySelector(".marks"), r = (marks || div).getBoundingClientRect();
    plots.push({id: div.id, marks: marks ? marks.tagName.toLowerCase() : null,
                images: Array.prototype.map.call(div.querySelectorAll("img"), function (i) { return i.naturalWidth; }),
                box: [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height]});
  });
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({plots: plots, height: document.documentElement.scrollHeight});
  document.body.appendChild(pre);
}, 2000); });
</script>
"""


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="/usr/bin/chromium is not installed (.ci/run installs it: "
                                                      "apt-get install chromium)")
def test_offline_plots_render_in_headless_chromium(tmp_path):
    """`dvc plots show` on the project's plot definitions and config, with fabricated metrics at
    the plot paths (no training), writes a page that draws every plot in a browser that cannot
    reach the network: each vega plot has its marks, and they are drawn on the screen."""
    from PIL import Image

    template = (ROOT / ".dvc" / _template()).resolve()
    assert template.is_file(), f"{template} is missing: `make setup` writes it (scripts/offline_plots.py)"
    text = template.read_text()
    if FALLBACK_MARK in text:
        pytest.skip(f"setup could not bundle vega, the page uses DVC's CDN scripts: {text.splitlines()[0]}")

    project = tmp_path / "project"
    for name in ("dvc.yaml", "params.yaml", ".dvc/config", ".dvc/config.local"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, project / name)
    copy = (project / ".dvc" / _template()).resolve()
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(template, copy)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    pipeline = yaml.safe_load((project / "dvc.yaml").read_text())
    tasks = pipeline["stages"]["train"]["foreach"]
    for task in tasks:
        history = _history()
        (project / "metrics" / task).mkdir(parents=True)
        with (project / "metrics" / task / "train_history.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in history for k in r)))
            w.writeheader()
            w.writerows(history)
        write_loss_plot(history, project / "reports" / task / "loss.png", task)
    for plot in pipeline.get("plots", []):  # top-level image plots: the digit sample grid
        path = project / (plot if isinstance(plot, str) else next(iter(plot)))
        if path.suffix == ".png" and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (80, 80), (40, 40, 40)).save(path)

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["dvc", "plots", "show"], cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    page = (project / "dvc_plots" / "index.html").read_text()
    assert "<script src=" not in page and "cdn.jsdelivr.net" not in page  # nothing to fetch
    vega_ids = set(re.findall(r'<div id = "([^"]+)">\s*<script', page))
    image_ids = set(re.findall(r'<div\s+id="([^"]+)"\s+style=', page))
    assert {f"metrics_{t}_train_history_csv" for t in tasks} <= vega_ids
    assert len(image_ids) == len(tasks) + 1  # loss.png per task, the sample grid

    probe = project / "dvc_plots" / "probe.html"
    head, tail = page.rsplit("</body>", 1)  # (the inlined vega code holds "</body>" strings too)
    probe.write_text(head + PROBE + "</body>" + tail)
    dom = _chromium(probe.as_uri(), tmp_path / "profile", "--window-size=1280,1024", "--dump-dom")
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.DOTALL)
    assert found, dom[-2000:]
    seen = json.loads(html.unescape(found.group(1)))
    plots = {p["id"]: p for p in seen["plots"]}
    assert set(plots) == vega_ids | image_ids
    for pid in vega_ids:
        assert plots[pid]["marks"] in ("canvas", "svg"), f"vega drew nothing in {pid}: {plots[pid]}"
    for pid in image_ids:
        assert plots[pid]["images"] and all(w > 0 for w in plots[pid]["images"]), plots[pid]

    shot = tmp_path / "page.png"
    _chromium(probe.as_uri(), tmp_path / "profile", f"--window-size=1280,{min(seen['height'], 8000)}",
              f"--screenshot={shot}")
    with Image.open(shot) as img:
        rgb = np.asarray(img.convert("RGB"))
    for pid, p in plots.items():
        x, y, w, h = (round(v) for v in p["box"])
        assert w > 50 and h > 50, p
        pixels = rgb[y : y + h, x : x + w]
        assert pixels.shape[:2] == (h, w), f"{pid} lies outside the screenshot {rgb.shape}"
        assert _ink(pixels) > 0.005 * w * h, f"{pid} is blank on the screen"
        if pid in vega_ids:
            assert _coloured(pixels) > w / 2, f"no loss curve drawn in {pid}"
