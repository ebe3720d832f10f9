"""Scaling laws: fit L(N, D) = E + A/N^α + B/D^β to training runs and say how to spend a budget.

The lecture's pipeline is "tune small, extrapolate": train a grid of small models, fit a law, and
read off the compute-optimal model size and token count for a budget far beyond the grid. Two of
Hoffmann et al.'s (2022, "Chinchilla") estimators are implemented:

* approach 3, the parametric fit, exactly as the paper and Epoch AI's replication do it
  (REFERENCE.md): in log space, log L̂ = LSE(a − α log N, b − β log D, e) with A = eᵃ, B = eᵇ,
  E = eᵉ; minimise the SUM over points of Huber(δ = 1e-3) of (log L̂ − log L) with L-BFGS from
  every point of the grid α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …, 1}, a, b ∈ {0, 5, …, 25}, and
  keep the best. The 4,500 starts are independent problems of 5 unknowns each, so they are solved
  together by one batched L-BFGS (per-start curvature history and per-start backtracking line
  search, vectorised in numpy); bootstrap refits are the same batched solver with per-start point
  weights (resampling with replacement = integer multiplicities), started from the best few starts.
* approach 2, IsoFLOP profiles: runs of (nearly) equal compute C = 6ND form a group; a parabola of
  loss in log N per group gives that budget's optimal N; N_opt ∝ C^a and D_opt ∝ C^b are then fitted
  across groups.

Compute-optimal allocation under C = 6ND has a closed form (REFERENCE.md):
N_opt = G (C/6)^{β/(α+β)}, D_opt = G⁻¹ (C/6)^{α/(α+β)}, G = (αA / (βB))^{1/(α+β)}.
"""

from __future__ import annotations

import csv
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import StageRun, finite_or_none, require_artifact, write_json_atomic
from .errors import StageError, UsageError

#: Hoffmann et al. (2022) / Epoch AI's grid of initial values (REFERENCE.md, "Scaling laws")
GRID_ALPHA = (0.0, 0.5, 1.0, 1.5, 2.0)
GRID_BETA = (0.0, 0.5, 1.0, 1.5, 2.0)
GRID_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
GRID_A = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
GRID_B = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
HUBER_DELTA = 1e-3
MIN_POINTS = 5
#: the keys of a finished pretrain run's manifest ``stats`` that this stage reads
RUN_KEYS = ("non_embedding_params", "tokens_seen", "final_val_loss")
PARAM_NAMES = ("E", "A", "B", "alpha", "beta")


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
@dataclass
class Points:
    """Training runs as arrays: non-embedding parameters N, tokens D, final loss L (nats/token)."""

    N: np.ndarray
    D: np.ndarray
    L: np.ndarray
    labels: list[str]
    #: IsoFLOP group of each run when known by design (a sweep's budget); None: group by measured C
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.L)

    @property
    def compute(self) -> np.ndarray:
        return 6.0 * self.N * self.D

    def distinct(self) -> int:
        return len({(float(n), float(d)) for n, d in zip(self.N, self.D, strict=True)})


def _check_values(where: str, values: dict[str, float]) -> None:
    for k, v in values.items():
        if not math.isfinite(v):
            raise UsageError(f"{where}: {k} is {v}; every params, tokens and loss value must be a finite number")
        if v <= 0:
            raise UsageError(f"{where}: {k} = {v:g} is not positive; params, tokens and loss must all be > 0")
    n, d = values.get("params", values.get("non_embedding_params")), values.get("tokens", values.get("tokens_seen"))
    if n is not None and d is not None and not math.isfinite(6.0 * n * d):
        raise UsageError(f"{where}: params × tokens = {n:g} × {d:g} overflows the compute 6ND; check the row's units")


def _check_enough(points: Points, source: str) -> Points:
    if points.distinct() < MIN_POINTS:
        raise UsageError(
            f"{source}: {points.distinct()} distinct (params, tokens) points; fitting E, A, B, α, β "
            f"needs at least {MIN_POINTS} — add runs"
        )
    # runs on one curve D ∝ N^k (e.g. a fixed tokens-per-parameter ratio) cannot tell the params
    # term from the data term: the fit is not identified, whatever the optimiser returns
    x, y = np.log(points.N), np.log(points.D)
    if np.ptp(x) > 0 and np.ptp(y) > 0:
        resid = y - np.polyval(np.polyfit(x, y, 1), x)
        if float(np.max(np.abs(resid))) < 0.05:
            k = float(np.polyfit(x, y, 1)[0])
            raise UsageError(
                f"{source}: every run lies on one curve tokens ∝ params^{k:.2f} (e.g. one tokens-per-parameter "
                "ratio), so the params and data terms cannot be told apart; add runs that vary params and "
                "tokens independently (an IsoFLOP sweep: llmctl scaling-fit sweep)"
            )
    return points


def read_csv(path: Path) -> Points:
    """Points from a CSV with columns params,tokens,loss (others ignored; '#' lines are comments)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such CSV file; check --from-csv")
    try:
        text = path.read_text(encoding="utf-8-sig")  # "-sig": spreadsheets' "CSV UTF-8" begins with a BOM
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read the CSV ({e}); give a UTF-8 text file") from e
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise UsageError(f"{path}: empty CSV; expected a header params,tokens,loss and one row per run")
    reader = csv.reader([ln for _, ln in lines])
    header = [h.strip().lower() for h in next(reader)]
    missing = [c for c in ("params", "tokens", "loss") if c not in header]
    if missing:
        raise UsageError(
            f"{path}: missing column(s) {', '.join(missing)} (found {', '.join(header) or 'none'}); "
            "the header must name params,tokens,loss"
        )
    col = {c: header.index(c) for c in ("params", "tokens", "loss")}
    N, D, L, labels = [], [], [], []
    for (lineno, _), row in zip(lines[1:], reader, strict=True):
        where = f"{path}:{lineno}"
        if len(row) < len(header):
            raise UsageError(f"{where}: {len(row)} fields, header has {len(header)}; fix the row")
        vals = {}
        for c, j in col.items():
            try:
                vals[c] = float(row[j])
            except ValueError:
                raise UsageError(f"{where}: {c} = {row[j]!r} is not a number; fix the row") from None
        _check_values(where, vals)
        N.append(vals["params"])
        D.append(vals["tokens"])
        L.append(vals["loss"])
        labels.append(f"line {lineno}")
    pts = Points(np.array(N, float), np.array(D, float), np.array(L, float), labels)
    return _check_enough(pts, str(path))


def read_runs(paths: Sequence[Path]) -> Points:
    """Points from finished pretrain run directories (their manifest's ``stats``)."""
    N, D, L, labels = [], [], [], []
    for p in paths:
        m = require_artifact(Path(p), ("pretrain",))
        stats = m.get("stats") or {}
        missing = [k for k in RUN_KEYS if k not in stats]
        if missing:
            raise UsageError(
                f"{p}: pretrain manifest has no stats {', '.join(missing)}; rerun that run with a "
                "pretrain that records them, or give the numbers with --from-csv"
            )
        empty = [k for k in RUN_KEYS if stats[k] is None]
        if empty:
            raise UsageError(
                f"{p}: pretrain manifest stats {', '.join(empty)} is null (no val split was scored); "
                "rerun that run with a val split, or leave it out"
            )
        try:
            vals = {k: float(stats[k]) for k in RUN_KEYS}
        except (TypeError, ValueError):
            raise UsageError(f"{p}: manifest stats {', '.join(RUN_KEYS)} must be numbers") from None
        _check_values(str(p), vals)
        N.append(vals["non_embedding_params"])
        D.append(vals["tokens_seen"])
        L.append(vals["final_val_loss"])
        labels.append(Path(p).name)
    pts = Points(np.array(N, float), np.array(D, float), np.array(L, float), labels)
    return _check_enough(pts, "runs")


def parse_count(text: str) -> float:
    """'7e9', '7B', '1.4T', '350M', '20k' → float (K, M, B/G, T suffixes; case-insensitive)."""
    s = str(text).strip().replace("_", "")
    mult = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    factor = 1.0
    if s and s[-1].lower() in mult:
        factor, s = mult[s[-1].lower()], s[:-1]
    try:
        v = float(s) * factor
    except ValueError:
        raise UsageError(f"{text!r}: not a number; write e.g. 7e9, 7B or 1.4T") from None
    if not math.isfinite(v) or v <= 0:
        raise UsageError(f"{text!r}: must be a positive finite number")
    return v


def parse_predict(text: str) -> tuple[float, float]:
    """'N,D' → (N, D), e.g. '70B,1.4T'."""
    parts = str(text).split(",")
    if len(parts) != 2:
        raise UsageError(f"--predict {text!r}: expected N,D such as 70e9,1.4e12")
    return parse_count(parts[0]), parse_count(parts[1])


# ------------------------------------------------------------------------------------------------
# approach 3: batched L-BFGS over every start
# ------------------------------------------------------------------------------------------------
def grid_starts() -> np.ndarray:
    """The full grid of initial (a, b, e, α, β), 4,500 rows, in the paper's order of loops."""
    rows = [
        (a, b, e, al, be)
        for al, be, e, a, b in itertools.product(GRID_ALPHA, GRID_BETA, GRID_E, GRID_A, GRID_B)
    ]
    return np.array(rows, dtype=np.float64)


def huber_objective(
    theta: np.ndarray,
    logN: np.ndarray,
    logD: np.ndarray,
    logL: np.ndarray,
    weights: np.ndarray | None = None,
    delta: float = HUBER_DELTA,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-start Σᵢ wᵢ·Huber_δ(LSE(a − α log Nᵢ, b − β log Dᵢ, e) − log Lᵢ) and its gradient.

    ``theta`` is [S, 5] = (a, b, e, α, β) per start; ``weights`` is None or [S, n] point
    multiplicities. Returns f [S] and ∂f/∂θ [S, 5] (analytic: the LSE's softmax weights times the
    Huber derivative clip(r, −δ, δ)).
    """
    a, b, e, al, be = (theta[:, k : k + 1] for k in range(5))
    x1 = a - al * logN
    x2 = b - be * logD
    m = np.maximum(x1, x2)
    np.maximum(m, e, out=m)
    x1 -= m
    np.exp(x1, out=x1)
    x2 -= m
    np.exp(x2, out=x2)
    x3 = e - m
    np.exp(x3, out=x3)
    s = x1 + x2
    s += x3
    r = np.log(s)
    r += m
    r -= logL
    hp = np.clip(r, -delta, delta)  # Huber'(r)
    h = r - 0.5 * hp
    h *= hp  # = ½r² inside ±δ, δ(|r| − ½δ) outside
    if weights is not None:
        h *= weights
        hp *= weights
    f = h.sum(axis=1)
    hp /= s
    x1 *= hp
    x2 *= hp
    x3 *= hp
    g = np.empty_like(theta)
    g[:, 0] = x1.sum(axis=1)
    g[:, 1] = x2.sum(axis=1)
    g[:, 2] = x3.sum(axis=1)
    g[:, 3] = -(x1 @ logN)
    g[:, 4] = -(x2 @ logD)
    return f, g


@dataclass
class LbfgsResult:
    x: np.ndarray  # [S, 5] final parameters
    f: np.ndarray  # [S] final objective (inf where it diverged)
    iterations: np.ndarray  # [S]
    converged: np.ndarray  # [S] bool: stopped on a tolerance, not on max_iter or failure
    evaluations: int


def batched_lbfgs(
    x0: np.ndarray,
    logN: np.ndarray,
    logD: np.ndarray,
    logL: np.ndarray,
    weights: np.ndarray | None = None,
    delta: float = HUBER_DELTA,
    memory: int = 10,
    max_iter: int = 500,
    gtol: float = 1e-9,
    ftol: float = 1e-10,
) -> LbfgsResult:
    """Minimise every start's objective independently, all starts in one vectorised loop.

    Each start keeps its own L-BFGS history (two-loop recursion), its own Armijo backtracking line
    search and its own stopping test: ‖g‖∞ ≤ gtol, or a relative decrease of f below ftol, or no
    step that decreases f. Starts that finish are dropped from the working set, so the cost falls
    as they converge.
    """
    S, P = x0.shape
    # f values below what residuals of 1e-8·δ in log loss add up to are as good as zero
    f_floor = 0.5 * (1e-8 * delta) ** 2 * logL.size / ftol
    x = x0.astype(np.float64).copy()
    f, g = huber_objective(x, logN, logD, logL, weights, delta)
    evals = 1
    it = np.zeros(S, dtype=np.int64)
    converged = np.zeros(S, dtype=bool)
    bad = ~np.isfinite(f) | ~np.isfinite(g).all(axis=1)
    f[bad] = np.inf
    active = np.flatnonzero(~bad)
    hs = np.zeros((memory, S, P))
    hy = np.zeros((memory, S, P))
    hrho = np.zeros((memory, S))  # 0 marks an empty or skipped slot
    slot = 0
    for _ in range(max_iter):
        if active.size == 0:
            break
        xa, fa, ga = x[active], f[active], g[active]
        wa = None if weights is None else weights[active]
        # two-loop recursion, newest to oldest then back
        q = ga.copy()
        alphas = np.zeros((memory, active.size))
        order = [(slot - 1 - k) % memory for k in range(memory)]
        for j in order:
            rho = hrho[j, active]
            alphas[j] = rho * np.einsum("ij,ij->i", hs[j, active], q)
            q -= alphas[j][:, None] * hy[j, active]
        newest = order[0]
        sy = np.einsum("ij,ij->i", hs[newest, active], hy[newest, active])
        yy = np.einsum("ij,ij->i", hy[newest, active], hy[newest, active])
        have = hrho[newest, active] > 0
        gnorm1 = np.abs(ga).sum(axis=1)
        gamma = np.where(have, sy / np.where(yy > 0, yy, 1.0), 1.0 / np.maximum(gnorm1, 1.0))
        r = gamma[:, None] * q
        for j in reversed(order):
            rho = hrho[j, active]
            beta = rho * np.einsum("ij,ij->i", hy[j, active], r)
            r += (alphas[j] - beta)[:, None] * hs[j, active]
        p = -r
        gp = np.einsum("ij,ij->i", ga, p)
        reset = ~(gp < 0) | ~np.isfinite(gp)
        if reset.any():  # not a descent direction: fall back to scaled steepest descent
            p[reset] = -ga[reset] / np.maximum(gnorm1[reset], 1.0)[:, None]
            gp[reset] = np.einsum("ij,ij->i", ga[reset], p[reset])
            hrho[:, active[reset]] = 0.0
        # backtracking Armijo line search, per start
        t = np.ones(active.size)
        xn, fn, gn = xa.copy(), fa.copy(), ga.copy()
        pending = np.arange(active.size)
        ok = np.zeros(active.size, dtype=bool)
        for _ls in range(60):
            if pending.size == 0:
                break
            xt = xa[pending] + t[pending, None] * p[pending]
            ft, gt = huber_objective(
                xt, logN, logD, logL, None if wa is None else wa[pending], delta
            )
            evals += 1
            good = np.isfinite(ft) & np.isfinite(gt).all(axis=1) & (
                ft <= fa[pending] + 1e-4 * t[pending] * gp[pending]
            )
            acc = pending[good]
            xn[acc], fn[acc], gn[acc], ok[acc] = xt[good], ft[good], gt[good], True
            pending = pending[~good]
            t[pending] *= 0.5
        # curvature pairs, stored where s·y > 0
        s_new = xn - xa
        y_new = gn - ga
        sy_new = np.einsum("ij,ij->i", s_new, y_new)
        store = ok & (sy_new > 1e-300) & np.isfinite(sy_new)
        hs[slot, active] = s_new
        hy[slot, active] = y_new
        hrho[slot, active] = np.where(store, 1.0 / np.where(store, sy_new, 1.0), 0.0)
        slot = (slot + 1) % memory
        x[active], f[active], g[active] = xn, fn, gn
        it[active] += 1
        small_g = np.abs(gn).max(axis=1) <= gtol
        small_f = ok & ((fa - fn) <= ftol * np.maximum(np.abs(fa), f_floor))
        done = small_g | small_f | ~ok
        converged[active[done & (small_g | small_f | (fa <= 1e-300))]] = True
        # no acceptable step: stationary to machine precision; count it converged if the gradient is tiny
        stuck = ~ok & ~small_g
        converged[active[stuck]] = np.abs(gn[stuck]).max(axis=1) <= 1e-6 * np.maximum(1.0, np.abs(fn[stuck]))
        active = active[~done]
    return LbfgsResult(x=x, f=f, iterations=it, converged=converged, evaluations=evals)


#: the largest log a float64 can exponentiate (e^709.78 is its maximum)
_LOG_MAX = 709.0


def _exp(x: float) -> float:
    return math.exp(x) if x < _LOG_MAX else math.inf  # beyond float range: a degenerate fit, not a crash


def to_natural(theta: np.ndarray) -> dict[str, float]:
    """(a, b, e, α, β) → {E, A, B, alpha, beta}; a coefficient past the float range is inf."""
    a, b, e, al, be = (float(v) for v in theta)
    return {"E": _exp(e), "A": _exp(a), "B": _exp(b), "alpha": al, "beta": be}


def predict_loss(p: dict[str, float], N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray:
    N, D = np.asarray(N, float), np.asarray(D, float)
    with np.errstate(over="ignore"):  # N^α past the float range (a degenerate fit's α): its term is 0
        return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def compute_optimal(p: dict[str, float], C: float) -> dict[str, float]:
    """Closed-form N_opt, D_opt for C = 6ND (REFERENCE.md); loss at the optimum.

    Defined only for α, β > 0 (a law whose loss does not fall with N or D has no optimum): NaN otherwise.
    """
    al, be = p["alpha"], p["beta"]
    if not (al > 0 and be > 0 and p["A"] > 0 and p["B"] > 0):
        nan = float("nan")
        return {"budget_flops": C, "N_opt": nan, "D_opt": nan, "tokens_per_param": nan, "loss": nan}
    G = (al * p["A"] / (be * p["B"])) ** (1.0 / (al + be))
    n = G * (C / 6.0) ** (be / (al + be))
    d = (C / 6.0) ** (al / (al + be)) / G
    return {
        "budget_flops": C,
        "N_opt": n,
        "D_opt": d,
        "tokens_per_param": d / n,
        "loss": float(predict_loss(p, n, d)),
    }


@dataclass
class Fit:
    theta: np.ndarray  # best (a, b, e, α, β)
    objective: float
    params: dict[str, float]
    start: np.ndarray  # the grid point the best fit came from
    order: np.ndarray  # indices of the starts, best first
    result: LbfgsResult


def fit_law(
    points: Points,
    delta: float = HUBER_DELTA,
    starts: np.ndarray | None = None,
    max_iter: int = 500,
    polish: int = 64,
) -> Fit:
    """Approach 3: L-BFGS from every start of the grid, the lowest objective kept.

    Every start runs until an iteration lowers its objective by less than 1e-6 of itself (about
    where scipy's L-BFGS-B default, used by Epoch, stops: an absolute 2.2e-9 on an objective of
    ~1e-3), then the ``polish`` best are run on to 1e-15,
    so the kept optimum is converged to machine precision without paying that for the thousands
    of starts that end in flat, degenerate regions (α or β near 0).
    """
    x0 = grid_starts() if starts is None else starts
    logN, logD, logL = np.log(points.N), np.log(points.D), np.log(points.L)
    res = batched_lbfgs(x0, logN, logD, logL, None, delta, max_iter=max_iter, ftol=1e-6, gtol=1e-7)
    fin = np.isfinite(res.f) & np.isfinite(res.x).all(axis=1)
    if not fin.any():
        raise StageError("scaling-fit: every start diverged; check that the losses follow a power law")
    top = np.argsort(np.where(fin, res.f, np.inf), kind="stable")[: min(polish, int(fin.sum()))]
    fine = batched_lbfgs(res.x[top], logN, logD, logL, None, delta, max_iter=20 * max_iter, ftol=1e-15, gtol=1e-12)
    better = np.isfinite(fine.f) & (fine.f <= res.f[top])
    res.x[top[better]], res.f[top[better]] = fine.x[better], fine.f[better]
    res.iterations[top] += fine.iterations
    res.converged[top] = fine.converged
    res.evaluations += fine.evaluations
    f = np.where(np.isfinite(res.f) & np.isfinite(res.x).all(axis=1), res.f, np.inf)
    order = np.argsort(f, kind="stable")
    best = int(order[0])
    return Fit(
        theta=res.x[best].copy(),
        objective=float(res.f[best]),
        params=to_natural(res.x[best]),
        start=x0[best].copy(),
        order=order,
        result=res,
    )


def bootstrap(
    points: Points,
    fit: Fit,
    n_boot: int,
    seed: int,
    n_starts: int = 4,
    delta: float = HUBER_DELTA,
    max_iter: int = 500,
) -> np.ndarray:
    """[n_boot, 5] (a, b, e, α, β) refitted on resampled points; NaN rows where every start failed.

    Each resample draws n points with replacement (as multiplicities); it is refitted from the full
    fit's optimum and the grid points of the ``n_starts`` − 1 next-best distinct optima, all resamples
    and starts in one batched solve.
    """
    if n_boot <= 0:
        return np.zeros((0, 5))
    rng = np.random.default_rng(seed)
    n = len(points)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)]).astype(float)
    starts = [fit.theta]
    seen = [fit.theta]
    x0_grid = grid_starts() if fit.result.x.shape[0] == 4500 else None
    for i in fit.order[1:]:
        if len(starts) >= n_starts or not np.isfinite(fit.result.f[i]):
            break
        xi = fit.result.x[i]
        if any(np.allclose(xi, s, rtol=1e-3, atol=1e-3) for s in seen):
            continue
        seen.append(xi)
        starts.append(x0_grid[i] if x0_grid is not None else xi)
    k = len(starts)
    x0 = np.tile(np.stack(starts), (n_boot, 1))
    w = np.repeat(counts, k, axis=0)
    logN, logD, logL = np.log(points.N), np.log(points.D), np.log(points.L)
    res = batched_lbfgs(x0, logN, logD, logL, w, delta, max_iter=max_iter, ftol=1e-13, gtol=1e-11)
    f = np.where(np.isfinite(res.f) & np.isfinite(res.x).all(axis=1), res.f, np.inf).reshape(n_boot, k)
    pick = np.argmin(f, axis=1)
    out = res.x.reshape(n_boot, k, 5)[np.arange(n_boot), pick].copy()
    out[~np.isfinite(f.min(axis=1))] = np.nan
    return out


# ------------------------------------------------------------------------------------------------
# approach 2: IsoFLOP profiles
# ------------------------------------------------------------------------------------------------
def isoflop_groups(points: Points, tol_decades: float) -> list[np.ndarray]:
    """Indices of runs grouped by compute: in order of compute, a group takes the runs within
    ``tol_decades`` of its first (lowest) one, so no two runs of a group differ by more than that.

    Runs whose groups are known by design (a sweep's budgets) keep those groups, ordered by compute.
    """
    lc = np.log10(points.compute)
    if points.groups is not None:
        labels = list(dict.fromkeys(points.groups.tolist()))
        idx = [np.flatnonzero(points.groups == g) for g in labels]
        return sorted(idx, key=lambda i: float(np.mean(lc[i])))
    order = np.argsort(lc, kind="stable")
    groups: list[list[int]] = [[int(order[0])]]
    for cur in order[1:]:
        if lc[cur] - lc[groups[-1][0]] > tol_decades:
            groups.append([])
        groups[-1].append(int(cur))
    return [np.array(g) for g in groups]


def approach2(points: Points, tol_decades: float = 0.05, min_runs: int = 3) -> dict[str, Any]:
    """IsoFLOP parabolas → per-budget N_opt → N_opt ∝ C^a, D_opt ∝ C^b (least squares in log-log)."""
    groups = []
    for idx in isoflop_groups(points, tol_decades):
        C = float(np.exp(np.mean(np.log(points.compute[idx]))))
        x = np.log(points.N[idx])
        g: dict[str, Any] = {"compute": C, "runs": len(idx), "distinct_sizes": len(np.unique(x))}
        if len(np.unique(x)) < min_runs:
            g["used"], g["reason"] = False, f"fewer than {min_runs} model sizes"
        else:
            c2, c1, c0 = np.polyfit(x, points.L[idx], 2)
            half = (x.max() - x.min()) / 2
            if not c2 > 0:
                g["used"], g["reason"] = False, "loss is not convex in log N"
            elif c2 * half * half <= 1e-6 * float(np.mean(np.abs(points.L[idx]))):
                # curvature of rounding noise: a flat profile has no minimum to read
                g["used"], g["reason"] = False, "loss is flat in log N"
            else:
                xs = -c1 / (2 * c2)
                if not x.min() <= xs <= x.max():
                    g["used"], g["reason"] = False, "minimum outside the sampled sizes"
                else:
                    n_opt = float(math.exp(xs))
                    g.update(
                        used=True,
                        N_opt=n_opt,
                        D_opt=C / (6 * n_opt),
                        loss_min=float(c0 - c1 * c1 / (4 * c2)),
                        parabola=[float(c2), float(c1), float(c0)],
                    )
        groups.append(g)
    used = [g for g in groups if g["used"]]
    out: dict[str, Any] = {
        "available": False,
        "grouping": "by design (sweep budgets)" if points.groups is not None else f"by compute, ±{tol_decades} decades",
        "tolerance_decades": tol_decades,
        "groups": groups,
    }
    if len(used) < 2:
        out["reason"] = f"{len(used)} IsoFLOP group(s) with a usable minimum; need 2 (≥{min_runs} sizes each)"
        return out
    lc = np.log([g["compute"] for g in used])
    a, ka = np.polyfit(lc, np.log([g["N_opt"] for g in used]), 1)
    b, kb = np.polyfit(lc, np.log([g["D_opt"] for g in used]), 1)
    out.update(available=True, a=float(a), b=float(b), N_coef=float(math.exp(ka)), D_coef=float(math.exp(kb)),
               groups_used=len(used))
    return out


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------
@dataclass
class FitConfig:
    runs: list[str] = field(default_factory=list)
    out: str = ""
    from_csv: str | None = None
    budget: list[float] = field(default_factory=list)
    predict: list[list[float]] = field(default_factory=list)
    bootstrap: int = 200
    bootstrap_starts: int = 4
    seed: int = 0
    ci: float = 0.95
    huber_delta: float = HUBER_DELTA
    isoflop_tol: float = 0.05
    max_iter: int = 500
    force: bool = False


def _interval(samples: np.ndarray, level: float) -> tuple[float | None, float | None, float | None]:
    s = samples[np.isfinite(samples)]
    if s.size < 2:
        return None, None, None
    lo, hi = np.quantile(s, [(1 - level) / 2, 1 - (1 - level) / 2])
    with np.errstate(over="ignore"):  # degenerate resamples can reach 1e165; their s.e. is then inf → null
        se = float(np.std(s, ddof=1))
    return float(lo), float(hi), se


def _fit_notes(points: Points, p: dict[str, float], params: dict[str, dict[str, Any]], boot_ok: int,
               cfg: FitConfig) -> list[str]:
    """Warnings for a fit the points do not determine, in the words results.json and the CLI show."""
    notes = []
    spread = float(points.L.max() - points.L.min())
    if spread <= 1e-3 * float(np.mean(points.L)):
        notes.append(f"the losses barely vary (range {spread:.3g}): the points cannot determine a scaling law; "
                     "add runs over a wider range of sizes and token counts")
    if not (p["alpha"] > 0 and p["beta"] > 0):
        notes.append("alpha or beta ≤ 0: loss does not fall with N or D, so there is no compute-optimal "
                     "allocation; add runs that span more sizes and token counts")
    if cfg.bootstrap:
        if boot_ok < 0.9 * cfg.bootstrap:
            notes.append(f"only {boot_ok} of {cfg.bootstrap} bootstrap resamples gave a usable fit: the law is unstable "
                         "under resampling; treat its parameters and allocations as rough")
        for k in ("alpha", "beta"):
            lo, hi, v = params[k]["ci_low"], params[k]["ci_high"], params[k]["value"]
            if lo is not None and hi - lo > abs(v):
                notes.append(f"{k} is poorly determined ({cfg.ci:.0%} interval {lo:.3g} to {hi:.3g} around {v:.3g}), so "
                             "is the compute-optimal allocation; add runs that vary sizes and token counts more widely")
    return notes


def analyse(points: Points, cfg: FitConfig) -> dict[str, Any]:
    """Everything results.json holds, computed from the points."""
    if not 0 < cfg.ci < 1:
        raise UsageError(f"--ci {cfg.ci}: must be between 0 and 1, e.g. 0.95")
    t0 = time.perf_counter()
    fit = fit_law(points, cfg.huber_delta, max_iter=cfg.max_iter)
    t_fit = time.perf_counter() - t0
    boots = bootstrap(points, fit, cfg.bootstrap, cfg.seed, cfg.bootstrap_starts, cfg.huber_delta, cfg.max_iter)
    t_boot = time.perf_counter() - t0 - t_fit
    # a resample whose coefficients leave the float range (A = e^800, say) is a failed fit
    ok = np.isfinite(boots).all(axis=1) & (boots[:, :3] < _LOG_MAX).all(axis=1)
    boot_params = [to_natural(th) for th in boots[ok]]

    def with_ci(value: float, samples: list[float]) -> dict[str, Any]:
        lo, hi, se = _interval(np.array(samples, float), cfg.ci)
        return {"value": value, "ci_low": lo, "ci_high": hi, "stderr": se}

    params = {k: with_ci(fit.params[k], [bp[k] for bp in boot_params]) for k in PARAM_NAMES}
    al, be = fit.params["alpha"], fit.params["beta"]
    optimal = []
    for C in cfg.budget:
        row = compute_optimal(fit.params, C)
        bo = [compute_optimal(bp, C) for bp in boot_params]
        optimal.append({"budget_flops": C} | {
            k: with_ci(row[k], [b[k] for b in bo]) for k in ("N_opt", "D_opt", "tokens_per_param", "loss")
        })
    preds = []
    for n, d in cfg.predict:
        preds.append({"N": n, "D": d, "compute": 6 * n * d} | {
            "loss": with_ci(float(predict_loss(fit.params, n, d)), [float(predict_loss(bp, n, d)) for bp in boot_params])
        })
    notes = _fit_notes(points, fit.params, params, int(ok.sum()), cfg)
    resid = np.log(predict_loss(fit.params, points.N, points.D)) - np.log(points.L)
    res = fit.result
    return {
        "law": "L(N, D) = E + A / N^alpha + B / D^beta",
        "method": "Hoffmann et al. approach 3: log-space LSE, sum of Huber(delta) of log residuals, "
        "L-BFGS from the full grid of starts, best kept",
        "n_points": len(points),
        "distinct_points": points.distinct(),
        "params": params,
        "log_params": dict(zip(("a", "b", "e", "alpha", "beta"), map(float, fit.theta), strict=True)),
        "objective": fit.objective,
        "best_start": dict(zip(("a", "b", "e", "alpha", "beta"), map(float, fit.start), strict=True)),
        "starts": int(res.x.shape[0]),
        "starts_converged": int(res.converged.sum()),
        "starts_within_1e-9_of_best": int(np.sum(res.f <= fit.objective + 1e-9)),
        "rmse_log_loss": float(np.sqrt(np.mean(resid**2))),
        "optimal_exponents": {"a": be / (al + be), "b": al / (al + be)},
        "bootstrap": {"n": cfg.bootstrap, "ok": int(ok.sum()), "seed": cfg.seed, "level": cfg.ci,
                      "starts_per_resample": cfg.bootstrap_starts, "interval": "percentile"},
        "compute_optimal": optimal,
        "predictions": preds,
        "approach2": approach2(points, cfg.isoflop_tol),
        "timing": {"fit_seconds": round(t_fit, 3), "bootstrap_seconds": round(t_boot, 3)},
        "notes": notes,
    }


def plot(points: Points, results: dict[str, Any], path: Path) -> None:
    """Three panels: data and fitted curves; IsoFLOP profiles (or fit vs observed); N_opt vs C."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    p = {k: v["value"] for k, v in results["params"].items()}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    norm = LogNorm(vmin=points.N.min(), vmax=max(points.N.max(), points.N.min() * 1.01))
    cmap = plt.get_cmap("viridis")

    ax = axes[0]
    sc = ax.scatter(points.D, points.L, c=points.N, cmap=cmap, norm=norm, s=18, edgecolors="k", linewidths=0.3)
    sizes = np.unique(points.N)
    if sizes.size > 8:
        sizes = np.exp(np.quantile(np.log(points.N), np.linspace(0, 1, 6)))
    dgrid = np.geomspace(points.D.min() / 1.5, points.D.max() * 1.5, 200)
    for n in sizes:
        ax.plot(dgrid, predict_loss(p, n, dgrid), color=cmap(norm(n)), lw=1)
    ax.set(xscale="log", yscale="log", xlabel="tokens D", ylabel="loss (nats/token)",
           title=f"fit: E={p['E']:.3g} A={p['A']:.3g} B={p['B']:.3g} α={p['alpha']:.3f} β={p['beta']:.3f}")
    fig.colorbar(sc, ax=ax, label="non-embedding params N")

    ax = axes[1]
    a2 = results["approach2"]
    used = [g for g in a2["groups"] if g.get("used")]
    if used:
        idx_groups = isoflop_groups(points, a2["tolerance_decades"])
        cnorm = LogNorm(vmin=min(g["compute"] for g in a2["groups"]), vmax=max(g["compute"] for g in a2["groups"]) * 1.01)
        for g, idx in zip(a2["groups"], idx_groups, strict=True):
            col = plt.get_cmap("plasma")(cnorm(g["compute"]))
            ax.scatter(points.N[idx], points.L[idx], color=col, s=14)
            if g.get("used"):
                x = np.linspace(np.log(points.N[idx]).min(), np.log(points.N[idx]).max(), 100)
                ax.plot(np.exp(x), np.polyval(g["parabola"], x), color=col, lw=1)
                ax.plot([g["N_opt"]], [g["loss_min"]], "x", color="k")
        ax.set(xscale="log", xlabel="non-embedding params N", ylabel="loss", title="IsoFLOP profiles (approach 2)")
    else:
        pred = predict_loss(p, points.N, points.D)
        ax.scatter(points.L, pred, s=12)
        lo, hi = min(points.L.min(), pred.min()), max(points.L.max(), pred.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="observed loss", ylabel="fitted loss", title="fit vs observed")

    ax = axes[2]
    cs = list(points.compute) + [b["budget_flops"] for b in results["compute_optimal"]]
    cgrid = np.geomspace(min(cs) / 2, max(cs) * 2, 100)
    nopt = np.array([compute_optimal(p, c)["N_opt"] for c in cgrid], dtype=float)
    ok = np.isfinite(nopt) & (nopt > 0)  # no optimum where the fit has none (β ≤ 0, say)
    cgrid, nopt = cgrid[ok], nopt[ok]
    ax.plot(cgrid, nopt, label=f"approach 3: N_opt ∝ C^{results['optimal_exponents']['a']:.3f}")
    if a2["available"]:
        ax.scatter([g["compute"] for g in used], [g["N_opt"] for g in used], color="C1", zorder=3)
        ax.plot(cgrid, a2["N_coef"] * cgrid ** a2["a"], color="C1", ls="--", label=f"approach 2: C^{a2['a']:.3f}")
    for b in results["compute_optimal"]:
        if b["N_opt"]["value"] is None:
            continue
        ax.plot([b["budget_flops"]], [b["N_opt"]["value"]], "r*", ms=12)
        ax.annotate(f"{b['tokens_per_param']['value']:.1f} tok/param", (b["budget_flops"], b["N_opt"]["value"]),
                    textcoords="offset points", xytext=(-60, 8), fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="compute-optimal N",
           title="compute-optimal model size")
    ax.legend(fontsize=8)
    # minor labels: plain numbers on the loss axes (they span less than a decade), none elsewhere
    loss_axes = [axes[0].yaxis, axes[1].yaxis] + ([] if used else [axes[1].xaxis])
    for axis in (a for ax in axes for a in (ax.xaxis, ax.yaxis)):
        axis.set_minor_formatter(FormatStrFormatter("%g") if axis in loss_axes else NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _publish(run: StageRun, points: Points, cfg_params: dict[str, Any], cfg: FitConfig) -> dict[str, Any]:
    results = analyse(points, cfg)
    results["points"] = [
        {"label": lab, "params": float(n), "tokens": float(d), "loss": float(lo)}
        for lab, n, d, lo in zip(points.labels, points.N, points.D, points.L, strict=True)
    ]
    results = finite_or_none(results)  # null, not NaN, where a number is undefined (the plot reads it so too)
    write_json_atomic(run.path("results.json"), results)
    plot(points, results, run.partial("scaling_fit.png"))
    run.commit("scaling_fit.png")
    p = results["params"]
    stats = {
        "points": len(points),
        "starts": results["starts"],
        "objective": results["objective"],
        **{k: p[k]["value"] for k in PARAM_NAMES},
        "fit_seconds": results["timing"]["fit_seconds"],
        "bootstrap_seconds": results["timing"]["bootstrap_seconds"],
        "approach2": results["approach2"]["available"],
    }
    run.finish(stats)
    return results


def run(cfg: FitConfig) -> dict[str, Any]:
    """``llmctl scaling-fit``: fit the runs (or CSV) and write results.json, the PNG and a manifest.

    Returns the results dict (or, for a finished no-op rerun, the stored one with ``done=True``).
    """
    if bool(cfg.runs) == bool(cfg.from_csv):
        raise UsageError("give either pretrain RUN directories or --from-csv FILE (one of the two)")
    if cfg.bootstrap < 0 or cfg.bootstrap_starts < 1:
        raise UsageError("--bootstrap must be ≥ 0 and --bootstrap-starts ≥ 1")
    if cfg.huber_delta <= 0 or cfg.isoflop_tol <= 0:
        raise UsageError("--huber-delta and --isoflop-tol must be > 0")
    points = read_csv(Path(cfg.from_csv)) if cfg.from_csv else read_runs([Path(r) for r in cfg.runs])
    inputs = [Path(cfg.from_csv)] if cfg.from_csv else [Path(r) for r in cfg.runs]
    params = asdict(cfg)
    params.pop("force")
    params.pop("out")
    st = StageRun.open(Path(cfg.out), "scaling-fit", params, inputs, force=cfg.force)
    if st.done:
        import json

        return json.loads((st.out / "results.json").read_text(encoding="utf-8")) | {"done": True}
    try:
        return _publish(st, points, params, cfg)
    except BaseException:
        st.abandon()
        raise


# ------------------------------------------------------------------------------------------------
# sweep: tune small, extrapolate
# ------------------------------------------------------------------------------------------------
#: pretrain options a sweep sets itself for every run; the rest may be set with ``--pretrain-set``
_SWEEP_SETS = ("tokens", "out", "n_layer", "d_model", "n_head", "max_tokens", "max_steps", "time_budget", "seed", "force")


@dataclass
class SweepConfig:
    tokens: str = ""
    out: str = ""
    sizes: list[str] = field(default_factory=list)  # "LAYERSxD_MODEL[xHEADS]"
    budgets: list[float] = field(default_factory=list)  # FLOPs per run
    seed: int = 0
    pretrain_set: list[str] = field(default_factory=list)  # "KEY=VALUE" options of every pretrain run
    fit: FitConfig = field(default_factory=FitConfig)
    force: bool = False


def parse_size(spec: str) -> tuple[int, int, int]:
    """'4x128' → (layers 4, d_model 128, heads d_model/64 or 1); '4x128x4' sets the heads."""
    parts = spec.lower().split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (2, 3) or min(nums) <= 0:
        raise UsageError(f"--sizes {spec!r}: expected LAYERSxD_MODEL or LAYERSxD_MODELxHEADS, e.g. 4x128")
    layers, d = nums[0], nums[1]
    heads = nums[2] if len(nums) == 3 else max(1, d // 64)
    if d % heads:
        raise UsageError(f"--sizes {spec!r}: d_model {d} is not divisible by {heads} heads")
    return layers, d, heads


def parse_pretrain_set(items: Sequence[str]) -> dict[str, Any]:
    """['seq_len=64', 'device=cpu'] → {'seq_len': 64, 'device': 'cpu'} (values read as TOML literals)."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--pretrain-set {item!r}: expected KEY=VALUE, e.g. seq_len=64")
        if key in _SWEEP_SETS:
            raise UsageError(f"--pretrain-set {key}: the sweep sets {key} itself; use --sizes/--budgets/--seed")
        try:
            out[key] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw.strip()
    return out


def approx_non_embedding_params(layers: int, d_model: int) -> float:
    """12·layers·d² (Kaplan et al. 2020): attention 4d² + MLP 8d² per block, for plans without a model."""
    return 12.0 * layers * d_model * d_model


def _pretrain_config(tokens: Path, out: Path, layers: int, d_model: int, heads: int, max_tokens: int, seed: int,
                     overrides: dict[str, Any]) -> Any:
    from dataclasses import fields

    from .train.pretrain import PretrainConfig

    known = {f.name: f for f in fields(PretrainConfig)}
    extra = {}
    for k, v in overrides.items():
        if k not in known:
            raise UsageError(f"--pretrain-set {k}: not a pretrain option; see llmctl pretrain --help")
        extra[k] = Path(v) if isinstance(v, str) and "Path" in str(known[k].type) else v
    return PretrainConfig(tokens=Path(tokens), out=Path(out), n_layer=layers, d_model=d_model, n_head=heads,
                          max_tokens=max_tokens, seed=seed, **extra)


def pretrain_once(tokens: Path, out: Path, layers: int, d_model: int, heads: int, max_tokens: int, seed: int,
                  overrides: dict[str, Any]) -> None:
    """Train one run of the sweep: THE one place that calls the pretrain stage.

    Uses its Python API, ``llmctl.train.pretrain.run(PretrainConfig)``, in this process (no torch
    import per run). A finished run is a no-op rerun, so an interrupted sweep resumes run by run.
    """
    from .train.pretrain import run as pretrain_run

    try:
        pretrain_run(_pretrain_config(tokens, out, layers, d_model, heads, max_tokens, seed, overrides))
    except UsageError as e:
        raise UsageError(f"sweep run {out.name}: {e}") from e
    except StageError as e:
        raise StageError(f"sweep run {out.name}: {e}") from e


def plan_sweep(cfg: SweepConfig, overrides: dict[str, Any]) -> list[tuple[str, int, int, int, float, int]]:
    """(name, layers, d_model, heads, budget, max_tokens) per run; tokens = budget / (6 · exact N)."""
    from .tokens import TokenArtifact

    vocab = TokenArtifact(Path(cfg.tokens)).vocab_size
    plan = []
    for (layers, d, heads), budget in itertools.product([parse_size(s) for s in cfg.sizes], cfg.budgets):
        pc = _pretrain_config(Path(cfg.tokens), Path("."), layers, d, heads, 1, cfg.seed, overrides)
        n = pc.model_config(vocab).non_embedding_params()
        plan.append((f"L{layers}-d{d}-h{heads}-C{budget:.3g}", layers, d, heads, budget, max(1, round(budget / (6 * n)))))
    return plan


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """``llmctl scaling-fit sweep``: a grid of (size, FLOP budget) pretrain runs, then the fit.

    Each run trains for budget / (6N) tokens with N the model's exact non-embedding count, so the
    runs of one budget form an IsoFLOP group (approach 2) besides feeding approach 3. The runs live
    under OUT/runs/; an interrupted sweep resumes (finished runs are no-ops, a cut run resumes from
    its checkpoint).
    """
    if not cfg.sizes or not cfg.budgets:
        raise UsageError("sweep needs --sizes and --budgets, e.g. --sizes 2x64,4x128 --budgets 1e12,3e12")
    sizes = [parse_size(s) for s in cfg.sizes]
    if any(not b > 0 for b in cfg.budgets):
        raise UsageError("--budgets must be positive FLOP counts such as 1e12")
    if len(sizes) * len(cfg.budgets) < MIN_POINTS:
        raise UsageError(
            f"sweep of {len(sizes) * len(cfg.budgets)} runs; the fit needs at least {MIN_POINTS} — add sizes or budgets"
        )
    tokens = Path(cfg.tokens)
    require_artifact(tokens, ("tokenize-encode",))  # what pretrain trains on
    overrides = parse_pretrain_set(cfg.pretrain_set)
    plan = plan_sweep(cfg, overrides)
    params = asdict(cfg)
    params.pop("force")
    params.pop("out")
    params["fit"].pop("force")
    params["fit"].pop("out")
    st = StageRun.open(Path(cfg.out), "scaling-fit", params, [tokens], force=cfg.force)
    if st.done:
        import json

        return json.loads((st.out / "results.json").read_text(encoding="utf-8")) | {"done": True}
    from .console import progress

    run_dirs = []
    with progress() as bar:
        task = bar.add_task("sweep", total=len(plan), unit="runs")
        for name, layers, d, heads, _budget, max_tokens in plan:
            rd = st.path(f"runs/{name}")
            rd.parent.mkdir(parents=True, exist_ok=True)
            pretrain_once(tokens, rd, layers, d, heads, max_tokens, cfg.seed, overrides)
            run_dirs.append(rd)
            bar.advance(task)
    points = read_runs(run_dirs)
    points.labels = [f"runs/{rd.name}" for rd in run_dirs]  # relative to the artifact
    points.groups = np.array([f"{p[4]:.6g}" for p in plan])
    return _publish(st, points, params, cfg.fit)
