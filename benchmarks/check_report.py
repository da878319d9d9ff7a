"""Open a `mame report` page in headless Chromium and check that its screenshot shows something.

    python benchmarks/check_report.py report.html [--screenshot report.png] [--height 3000]

Chromium renders the page from disk with networking off (the page must need nothing from outside); the screenshot
passes when it is not blank: enough non-white pixels, and enough colours for plots and pictures rather than text
alone. Exit status 0 = shown, 1 = blank, 2 = Chromium missing or failed (Debian: apt-get install -y chromium).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

MIN_INK = 0.02  # share of pixels that are not (near) white
MIN_COLOURS = 200  # distinct colours: text alone has a few grey levels, plots and photos have many


def screenshot(page: Path, out: Path, width: int = 1300, height: int = 3000) -> Path:
    """Render ``page`` with headless Chromium into the PNG ``out``."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise FileNotFoundError("chromium not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        # --no-sandbox: containers run as root, where Chromium's sandbox refuses to start.
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   "--disable-background-networking", "--proxy-server=127.0.0.1:9", f"--user-data-dir={profile}",
                   f"--window-size={width},{height}", f"--screenshot={out.resolve()}", page.resolve().as_uri()]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    return out


def blank_reason(png: Path) -> str | None:
    """Why the screenshot looks blank, or None when it shows plots or pictures."""
    pixels = np.asarray(Image.open(png).convert("RGB"))
    ink = float((pixels.min(axis=-1) < 235).mean())
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    if ink < MIN_INK:
        return f"only {ink:.1%} of the pixels are not white"
    if colours < MIN_COLOURS:
        return f"only {colours} distinct colours: no plots or pictures"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("--screenshot", type=Path, default=None, help="where to keep the PNG (default: beside the "
                                                                      "page, <page>.png)")
    parser.add_argument("--height", type=int, default=3000)
    args = parser.parse_args(argv)
    out = args.screenshot or args.page.with_suffix(".png")
    try:
        screenshot(args.page, out, height=args.height)
    except (FileNotFoundError, subprocess.SubprocessError) as error:
        print(f"cannot render {args.page}: {error}", file=sys.stderr)
        return 2
    reason = blank_reason(out)
    if reason is not None:
        print(f"{out}: blank: {reason}", file=sys.stderr)
        return 1
    print(f"{out}: the page shows plots and pictures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
