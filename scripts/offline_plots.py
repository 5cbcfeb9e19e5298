"""Write the page template `dvc plots show` fills (`.dvc/config`: plots.html_template) with vega,
vega-lite and vega-embed inlined, so `dvc_plots/index.html` draws its curves with no internet.

DVC's own page loads those three scripts from a CDN: on a cluster node without internet, or a
laptop on a train, the loss curves stay blank. `make setup` runs this once. It fetches the exact
versions DVC's page names (read from the installed dvc_render) as npm tarballs (`npm pack`: the
three packages alone, no dependency tree, no install scripts; each tarball ships its minified
browser build) into a cache folder, and writes the template, keeping DVC's `{plot_divs}` and
`{refresh_tag}` placeholders (and leaving out `{scripts}`, DVC's CDN tags).

If npm is missing or cannot reach its registry, it says so and writes DVC's default page instead
(the plots then need internet, as before), and exits 0: setup goes on. Run it again later:

    .venv/bin/python scripts/offline_plots.py
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".cache" / "plots" / "offline.html"
PACKAGES = ("vega", "vega-lite", "vega-embed")
# What dvc_render 1.x's VegaRenderer.SCRIPTS loads; used only where dvc_render does not import.
DEFAULT_VERSIONS = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}
FALLBACK_MARK = "offline-plots: fallback"  # the test of the offline page skips on this template

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- vega, vega-lite and vega-embed inlined by scripts/offline_plots.py: this page needs no network -->
%s
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>"""


def dvc_versions() -> dict[str, str]:
    """The versions DVC's own page loads from the CDN, so the offline page draws the same plots."""
    try:
        from dvc_render.vega import VegaRenderer
    except ImportError:
        return dict(DEFAULT_VERSIONS)
    found = dict(re.findall(r"npm/(vega(?:-lite|-embed)?)@([\w.\-]+)", VegaRenderer.SCRIPTS))
    return {p: found.get(p, DEFAULT_VERSIONS[p]) for p in PACKAGES}


def dvc_default_page() -> str:
    try:
        from dvc_render.html import PAGE_HTML
    except ImportError:
        return ("<!DOCTYPE html>\n<html>\n<head>\n{refresh_tag}\n{scripts}\n</head>\n"
                "<body>\n{plot_divs}\n</body>\n</html>")
    return PAGE_HTML


def fetch(versions: dict[str, str], cache: Path) -> dict[str, str]:
    """Each package's minified browser build (`build/<name>.min.js`), from npm tarballs kept in `cache`."""
    cache.mkdir(parents=True, exist_ok=True)
    tarballs = {p: cache / f"{p}-{v}.tgz" for p, v in versions.items()}
    missing = [f"{p}@{versions[p]}" for p, t in tarballs.items() if not t.is_file()]
    if missing:
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is not installed")
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            proc = subprocess.run([npm, "pack", *missing, "--pack-destination", tmp, "--loglevel=error",
                                   "--fetch-retries=1", "--fetch-retry-mintimeout=2000", "--fetch-timeout=60000"],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode:
                tail = [line for line in (proc.stderr + proc.stdout).strip().splitlines()
                        if "complete log of this run" not in line][:3]
                raise RuntimeError(f"`npm pack {' '.join(missing)}` failed: {' | '.join(tail)}")
            for t in tarballs.values():
                if not t.is_file():
                    os.replace(Path(tmp) / t.name, t)
    scripts = {}
    for p, t in tarballs.items():
        with tarfile.open(t) as tar:
            js = tar.extractfile(f"package/build/{p}.min.js").read().decode("utf-8")
        js = re.sub(r"\n?//# sourceMappingURL=\S+\s*$", "", js)  # no map to look for
        scripts[p] = js.replace("</script", "<\\/script")  # (a literal end tag would close the element)
    return scripts


def page(scripts: dict[str, str], versions: dict[str, str]) -> str:
    tags = "\n".join(f"    <script>/* {p}@{versions[p]} */\n{scripts[p]}\n    </script>" for p in PACKAGES)
    # DVC fills the template by plain replacement of these names: the inlined code must not hold them
    assert not any(f"{{{n}}}" in tags for n in ("plot_divs", "scripts", "refresh_tag")), "placeholder in vega"
    return PAGE.replace("%s", tags, 1)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT, help=f"the template to write (default {OUT.relative_to(ROOT)})")
    ap.add_argument("--cache", type=Path, default=None, help="where the npm tarballs are kept (default: beside --out)")
    args = ap.parse_args(argv)
    versions = dvc_versions()
    names = ", ".join(f"{p}@{v}" for p, v in versions.items())
    try:
        scripts = fetch(versions, args.cache or args.out.parent / "npm")
    except (RuntimeError, OSError, KeyError, tarfile.TarError, subprocess.TimeoutExpired) as e:
        if args.out.is_file() and FALLBACK_MARK not in args.out.read_text(encoding="utf-8")[:200]:
            print(f"note: could not fetch {names} ({e}); keeping the offline template already in {args.out}",
                  file=sys.stderr)
            return 0
        print(f"WARNING: could not bundle {names} for offline plots: {e}.\n"
              f"  `dvc plots show` keeps DVC's default page, which loads them from cdn.jsdelivr.net: its loss "
              f"curves need internet to draw.\n  When npm can reach its registry, run: "
              f"{os.path.relpath(sys.executable)} scripts/offline_plots.py", file=sys.stderr)
        write(args.out, f"<!-- {FALLBACK_MARK}: {str(e)[:300].replace('--', '- -')} -->\n" + dvc_default_page())
        return 0
    write(args.out, page(scripts, versions))
    print(f"offline plots: {names} inlined into {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
