#!/usr/bin/env python
"""The README's picture of the demo's report: headless Chromium opens report.html and the top of the page is saved.

    python scripts/report_screenshot.py                       # runs `python eval.py` first when there is no report
    python scripts/report_screenshot.py --report outputs/demo_val/report.html --out docs/report.png

Needs selenium and Debian's chromium + chromium-driver (the test extra; .ci/run installs them).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/browser.py: the project's one way of driving the browser


def screenshot(report: Path, out: Path, width: int = 1280, height: int = 1560) -> Path:
    """The first `height` pixels of the page at `width`, as a PNG."""
    from browser import open_page

    full = out.with_name(out.stem + ".full.png")
    with open_page(report, full, width=width, max_height=height + 200, skip_if_missing=False) as page:
        if page.console_errors:
            raise SystemExit(f"{report}: console errors: {page.console_errors}")
    with Image.open(full) as image:
        top = image.convert("RGB").crop((0, 0, width, min(height, image.height)))
    full.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    top.save(out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, default=REPO / "outputs" / "demo_val" / "report.html")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "report.png")
    args = parser.parse_args(argv)
    if not args.report.exists():
        subprocess.run([sys.executable, "eval.py"], cwd=REPO, check=True)
    print(f"wrote {screenshot(args.report, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
