"""Benchmark: scaling-fit wall time on 240 points with the full 4,500-start grid (target < 30 s on 2 cores).

Measures, on the Chinchilla points of tests/data/chinchilla_points.csv (Epoch's 240; synthetic
points from the Hoffmann et al. law when the file is absent):

1. ``fit_law`` in process: the batched L-BFGS over all 4,500 starts + polishing (wall and CPU seconds; on a machine shared by other jobs the CPU seconds are what an idle
   machine's wall clock would show, the work being one thread of numpy);
2. the whole command, ``llmctl scaling-fit --from-csv … --bootstrap 0`` and with the default
   ``--bootstrap 200``, as a user runs it (wall seconds, process start included);
3. the peer: the per-start loop of Epoch AI's replication — scipy.optimize.minimize(L-BFGS-B) from
   each grid start in turn, with finite-difference gradients as in their notebook and with our
   analytic gradient — timed on an evenly spaced subset of the starts and scaled to 4,500.

Usage: .venv/bin/python scripts/bench_scaling.py [--peer-starts 450] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from llmctl import scaling

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "chinchilla_points.csv"


def points_240() -> tuple[scaling.Points, str]:
    if DATA.is_file():
        rows = np.loadtxt(DATA, delimiter=",", comments="#", skiprows=4)
        N, D, L = rows[:, 0], rows[:, 1], rows[:, 3]
        keep = L < np.sort(L)[-5]  # Epoch's selection: drop the five highest-loss runs
        return scaling.Points(N[keep], D[keep], L[keep], []), "Chinchilla Figure 4 points (Epoch's 240)"
    rng = np.random.default_rng(0)
    N = np.exp(rng.uniform(np.log(7e7), np.log(1.6e10), 240))
    D = np.exp(rng.uniform(np.log(5e9), np.log(5e11), 240))
    true = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
    L = scaling.predict_loss(true, N, D) * np.exp(rng.normal(0, 0.01, 240))
    return scaling.Points(N, D, L, []), "240 synthetic points (Hoffmann law, 1% noise)"


def timed_cli(csv: Path, out: Path, *extra: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child: user + system)."""
    env = {**os.environ, "LLMCTL_PROGRESS": "0"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "llmctl", "scaling-fit", "--from-csv", str(csv), "--out", str(out),
                        *extra], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"llmctl failed: {p.stderr.strip()}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def peer(points: scaling.Points, n_starts: int, analytic: bool) -> tuple[float, float, float]:
    """scipy L-BFGS-B start by start on a subset; returns (seconds for 4,500 starts, best f, subset seconds)."""
    logN, logD, logL = np.log(points.N), np.log(points.D), np.log(points.L)
    grid = scaling.grid_starts()
    subset = grid[np.linspace(0, len(grid) - 1, n_starts).round().astype(int)]

    def f(t):
        return scaling.huber_objective(t[None], logN, logD, logL)[0][0]

    def g(t):
        return scaling.huber_objective(t[None], logN, logD, logL)[1][0]

    best = np.inf
    t0 = time.perf_counter()
    for x0 in subset:
        r = minimize(f, x0, jac=g if analytic else None, method="L-BFGS-B")
        if r.success and r.fun < best:
            best = r.fun
    sub = time.perf_counter() - t0
    return sub * len(grid) / n_starts, best, sub


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer-starts", type=int, default=450, help="grid starts the scipy peer is timed on")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    points, what = points_240()
    load = os.getloadavg()[0]
    print(f"data: {what}; {os.cpu_count()} CPUs, load average {load:.1f} at start")

    t, c = time.perf_counter(), time.process_time()
    fit = scaling.fit_law(points)
    fit_wall, fit_cpu = time.perf_counter() - t, time.process_time() - c
    p = fit.params
    print(f"fit_law, 4,500 starts: {fit_wall:.2f} s wall, {fit_cpu:.2f} s CPU; objective {fit.objective:.10g}; "
          f"E={p['E']:.4g} A={p['A']:.4g} B={p['B']:.4g} alpha={p['alpha']:.4g} beta={p['beta']:.4g}")

    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "points.csv"
        csv.write_text("params,tokens,loss\n" + "".join(
            f"{float(n)!r},{float(d)!r},{float(lo)!r}\n" for n, d, lo in zip(points.N, points.D, points.L, strict=True)))
        cli0 = timed_cli(csv, Path(tmp) / "fit0", "--bootstrap", "0")
        cli200 = timed_cli(csv, Path(tmp) / "fit200", "--bootstrap", "200", "--budget", "1e21")
    print(f"llmctl scaling-fit --bootstrap 0:   {cli0[0]:.2f} s wall, {cli0[1]:.2f} s CPU (target < 30 s)")
    print(f"llmctl scaling-fit --bootstrap 200: {cli200[0]:.2f} s wall, {cli200[1]:.2f} s CPU")

    c_peer = time.process_time()
    peer_fd, best_fd, sub_fd = peer(points, args.peer_starts, analytic=False)
    cpu_fd = (time.process_time() - c_peer) * len(scaling.grid_starts()) / args.peer_starts
    c_peer = time.process_time()
    peer_an, best_an, sub_an = peer(points, args.peer_starts, analytic=True)
    cpu_an = (time.process_time() - c_peer) * len(scaling.grid_starts()) / args.peer_starts
    print(f"peer (Epoch's loop: scipy L-BFGS-B per start, finite-difference gradients): "
          f"{sub_fd:.1f} s for {args.peer_starts} starts → {peer_fd:.0f} s for 4,500 "
          f"(best f on the subset {best_fd:.10g}); CPU {cpu_fd:.0f} s, ratio {cpu_fd / fit_cpu:.0f}× our fit_law's CPU")
    print(f"peer (same loop with our analytic gradient): {sub_an:.1f} s → {peer_an:.0f} s for 4,500 "
          f"(best f {best_an:.10g}); CPU {cpu_an:.0f} s, ratio {cpu_an / fit_cpu:.0f}×")
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({
            "data": what, "fit_wall_s": fit_wall, "fit_cpu_s": fit_cpu, "objective": fit.objective, "params": p,
            "cli_bootstrap0_wall_s": cli0[0], "cli_bootstrap0_cpu_s": cli0[1],
            "cli_bootstrap200_wall_s": cli200[0], "cli_bootstrap200_cpu_s": cli200[1],
            "peer_scipy_fd_wall_s_4500": peer_fd, "peer_scipy_fd_cpu_s_4500": cpu_fd,
            "peer_scipy_analytic_wall_s_4500": peer_an, "peer_scipy_analytic_cpu_s_4500": cpu_an,
            "peer_starts_timed": args.peer_starts, "load_average": load,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
