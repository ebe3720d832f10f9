"""`make demo`: the pipeline end to end on a small real site that every machine with Python has.

Renders a few dozen standard-library modules' documentation to HTML with pydoc, serves it on
127.0.0.1, crawls it, extracts it, and prints where each artifact is. Every step is a stage run
whose rerun is a no-op, so running the demo again takes seconds. Later stages append a Step to
STEPS (a name, the artifact it writes, and a function building the llmctl arguments).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from sitegen import port_is_free, render_pydoc_site, serve  # noqa: E402

OUT = ROOT / "demo-out"
PREFERRED_PORT = 8731  # a fixed address keeps the crawl's parameters, and so its no-op rerun, stable


@dataclass
class Context:
    out: Path
    base_url: str = ""
    site_moved: bool = False  # the site is served at another address than last time: redo the crawl
    artifacts: dict[str, Path] = field(default_factory=dict)


@dataclass
class Step:
    name: str
    artifact: str  # directory under demo-out/
    args: Callable[[Context], list[str]]  # the llmctl arguments (without --out)
    available: Callable[[], bool] = lambda: True
    force: Callable[[Context], bool] = lambda ctx: False


def _has_stage(module: str) -> Callable[[], bool]:
    return lambda: importlib.util.find_spec(f"llmctl.cli.{module}") is not None


STEPS: list[Step] = [
    Step(
        "crawl",
        "crawl",
        lambda ctx: [
            "crawl", f"{ctx.base_url}/index.html", "--allow-private", "--delay", "0", "--per-host", "4",
            "--max-pages", "500",
        ],
        force=lambda ctx: ctx.site_moved,
    ),
    Step(
        "extract",
        "docs",
        lambda ctx: ["extract", str(ctx.artifacts["crawl"]), "--workers", "2"],
        available=_has_stage("extract"),
        force=lambda ctx: ctx.site_moved,
    ),
]


def llmctl(*args: str) -> None:
    cmd = [sys.executable, "-m", "llmctl", *args]
    print("$ llmctl " + " ".join(args), flush=True)
    res = subprocess.run(cmd, cwd=ROOT)
    if res.returncode != 0:
        sys.exit(f"demo: `llmctl {args[0]}` failed with exit code {res.returncode}")


def main() -> None:
    t0 = time.time()
    site = OUT / "site"
    n = render_pydoc_site(site)
    print(f"site: {site} ({'rendered ' + str(n) + ' pages' if n else 'already rendered'})")
    port_file = OUT / "site-port"
    last_port = int(port_file.read_text()) if port_file.exists() else PREFERRED_PORT
    port = last_port if port_is_free(last_port) else 0
    with serve(site, port) as base_url:
        ctx = Context(out=OUT, base_url=base_url)
        used = int(base_url.rsplit(":", 1)[1])
        ctx.site_moved = port_file.exists() and used != last_port
        port_file.write_text(str(used))
        print(f"serving the site at {base_url}/")
        for step in STEPS:
            dest = OUT / step.artifact
            if not step.available():
                print(f"\n== {step.name}: not available in this checkout yet; skipped")
                continue
            print(f"\n== {step.name} → {dest}")
            llmctl(*step.args(ctx), "--out", str(dest), *(["--force"] if step.force(ctx) else []))
            ctx.artifacts[step.name] = dest
    print(f"\ndemo finished in {time.time() - t0:.1f} s. Artifacts:")
    for name, path in ctx.artifacts.items():
        print(f"  {name:<10} {path.relative_to(ROOT)}/  (manifest.json describes it)")


if __name__ == "__main__":
    main()
