"""``llmctl scaling-fit``: fit a scaling law to runs (default action) and ``sweep`` small runs to fit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..console import console, summary, table
from ..errors import UsageError
from . import app
from .common import ConfigOpt, DefaultGroup, ForceOpt, SeedOpt

# llmctl.scaling (numpy, scipy) is imported inside the commands so that every other command starts fast.
HUBER_DELTA = 1e-3  # REFERENCE.md; equals llmctl.scaling.HUBER_DELTA (tested)


class _Group(DefaultGroup):
    """``scaling-fit ARGS`` runs ``fit``; ``scaling-fit sweep …`` the sweep; no arguments: the help."""

    default_command = "fit"

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, args or ["--help"])


group = typer.Typer(
    cls=_Group,
    help=(
        "Fit L(N, D) = E + A/N^α + B/D^β to pretrain runs and plan the compute-optimal next run.\n\n"
        "Example: [bold]llmctl scaling-fit runs/* --out fits/v1 --budget 1e21 --predict 7B,140B[/]"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(group, name="scaling-fit")

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory (the scaling-fit artifact).")]
BudgetOpt = Annotated[
    list[str] | None,
    typer.Option("--budget", help="Compute budget to allocate, in FLOPs counted as C = 6ND with N the non-embedding parameters the fit uses (a pretrain manifest's train_compute_flops also counts attention and the head, so it is larger); repeatable, e.g. 1e21 or 5.76e23."),
]
PredictOpt = Annotated[
    list[str] | None,
    typer.Option("--predict", help="N,D of a proposed run whose loss to predict; repeatable, e.g. 70B,1.4T."),
]
BootOpt = Annotated[int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples for the intervals (0: none).")]
BootStartsOpt = Annotated[
    int, typer.Option("--bootstrap-starts", min=1, help="Starts per resample: the fit's optimum + the next-best grid starts.")
]
CiOpt = Annotated[float, typer.Option("--ci", help="Confidence level of the percentile intervals.")]
DeltaOpt = Annotated[float, typer.Option("--huber-delta", help="Huber δ on log-loss residuals (Chinchilla: 1e-3).")]
TolOpt = Annotated[
    float, typer.Option("--isoflop-tol", help="Runs whose log10 C differ by at most this form one IsoFLOP group.")
]
MaxIterOpt = Annotated[int, typer.Option("--max-iter", min=1, help="L-BFGS iterations per start at most.")]


def _fit_config(runs: list[Path] | None, out: Path, from_csv: Path | None, budget: list[str] | None,
                predict: list[str] | None, bootstrap: int, bootstrap_starts: int, seed: int, ci: float,
                huber_delta: float, isoflop_tol: float, max_iter: int, force: bool) -> Any:
    from .. import scaling

    return scaling.FitConfig(
        runs=[str(r) for r in runs or []],
        out=str(out),
        from_csv=str(from_csv) if from_csv else None,
        budget=[scaling.parse_count(b) for b in budget or []],
        predict=[list(scaling.parse_predict(p)) for p in predict or []],
        bootstrap=bootstrap,
        bootstrap_starts=bootstrap_starts,
        seed=seed,
        ci=ci,
        huber_delta=huber_delta,
        isoflop_tol=isoflop_tol,
        max_iter=max_iter,
        force=force,
    )


def _g(v: float | None, fmt: str = "{:.4g}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _ci(v: dict[str, Any]) -> str:
    if v.get("ci_low") is None or v.get("ci_high") is None:
        return "—"
    return f"{v['ci_low']:.4g} … {v['ci_high']:.4g}"


def _print(res: dict[str, Any], out: Path) -> None:
    level = res["bootstrap"]["level"]
    names = {"E": "E", "A": "A", "B": "B", "alpha": "α", "beta": "β"}
    table(
        f"L(N, D) = E + A/N^α + B/D^β  ({res['n_points']} points, {res['starts']} starts, "
        f"{res['bootstrap']['ok']} bootstrap resamples)",
        ["parameter", "estimate", f"{level:.0%} interval", "bootstrap s.e."],
        [[names[k], v["value"], _ci(v), v["stderr"] if v["stderr"] is not None else "—"]
         for k, v in res["params"].items()],
    )
    if res["compute_optimal"]:
        table(
            "compute-optimal allocation (C = 6ND)",
            ["budget (FLOPs)", "N_opt", "D_opt", "tokens/param", "loss", f"N_opt {level:.0%}"],
            [[f"{r['budget_flops']:.3g}", _g(r["N_opt"]["value"]), _g(r["D_opt"]["value"]),
              _g(r["tokens_per_param"]["value"]), _g(r["loss"]["value"]), _ci(r["N_opt"])]
             for r in res["compute_optimal"]],
        )
    if res["predictions"]:
        table(
            "predicted loss",
            ["N", "D", "C = 6ND", "loss", f"{level:.0%} interval"],
            [[f"{p['N']:.4g}", f"{p['D']:.4g}", f"{p['compute']:.3g}", p["loss"]["value"], _ci(p["loss"])]
             for p in res["predictions"]],
        )
    a2 = res["approach2"]
    rows: list[tuple[str, object]] = [
        ("N_opt ∝ C^a (approach 3)", round(res["optimal_exponents"]["a"], 4)),
        ("D_opt ∝ C^b (approach 3)", round(res["optimal_exponents"]["b"], 4)),
    ]
    if a2["available"]:
        rows += [("N_opt ∝ C^a (approach 2, IsoFLOP)", round(a2["a"], 4)),
                 ("D_opt ∝ C^b (approach 2, IsoFLOP)", round(a2["b"], 4)),
                 ("IsoFLOP groups used", a2["groups_used"])]
    else:
        rows.append(("approach 2 (IsoFLOP)", f"n/a: {a2['reason']}"))
    rows += [("objective (Σ Huber)", res["objective"]), ("RMSE of log loss", res["rmse_log_loss"]),
             ("fit seconds", res["timing"]["fit_seconds"]), ("bootstrap seconds", res["timing"]["bootstrap_seconds"]),
             ("output", str(out))]
    summary("scaling-fit" + (" (already complete)" if res.get("done") else ""), rows)
    for note in res["notes"]:
        console.print(f"[yellow]warning:[/] {note}")


@group.command("fit")
def fit(
    runs: Annotated[list[Path] | None, typer.Argument(help="Finished pretrain run directories.", show_default=False)] = None,
    out: OutOpt = ...,  # type: ignore[assignment]
    from_csv: Annotated[
        Path | None, typer.Option("--from-csv", help="CSV with columns params,tokens,loss instead of runs.")
    ] = None,
    budget: BudgetOpt = None,
    predict: PredictOpt = None,
    bootstrap: BootOpt = 200,
    bootstrap_starts: BootStartsOpt = 4,
    seed: SeedOpt = 0,
    ci: CiOpt = 0.95,
    huber_delta: DeltaOpt = HUBER_DELTA,
    isoflop_tol: TolOpt = 0.05,
    max_iter: MaxIterOpt = 500,
    force: ForceOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Fit E, A, B, α, β (Chinchilla approach 3, full grid of starts) with bootstrap intervals.

    Also IsoFLOP (approach 2) exponents when runs share compute budgets, the compute-optimal N and D
    for each --budget, and the predicted loss for each --predict. Writes results.json and
    scaling_fit.png.

    Examples:

      llmctl scaling-fit runs/s1 runs/s2 runs/s3 runs/s4 runs/s5 --out fits/v1 --budget 1e18

      llmctl scaling-fit --from-csv chinchilla.csv --out fits/chin --budget 5.76e23 --predict 70B,1.4T
    """
    cfg = _fit_config(runs, out, from_csv, budget, predict, bootstrap, bootstrap_starts, seed, ci,
                      huber_delta, isoflop_tol, max_iter, force)
    from .. import scaling

    _print(scaling.run(cfg), out)


@group.command("sweep")
def sweep(
    tokens: Annotated[Path, typer.Argument(help="A tokenize artifact to train every run on.")],
    out: OutOpt = ...,  # type: ignore[assignment]
    sizes: Annotated[
        str, typer.Option("--sizes", help="Comma-separated LAYERSxD_MODEL\\[xHEADS] model shapes, e.g. 2x64,4x128,6x192.")
    ] = "",
    budgets: Annotated[str, typer.Option("--budgets", help="Comma-separated FLOP budgets per run, e.g. 1e12,3e12,1e13.")] = "",
    pretrain_set: Annotated[
        list[str] | None,
        typer.Option("--pretrain-set", help="KEY=VALUE pretrain option for every run (repeatable), e.g. seq_len=64."),
    ] = None,
    budget: BudgetOpt = None,
    predict: PredictOpt = None,
    bootstrap: BootOpt = 200,
    bootstrap_starts: BootStartsOpt = 4,
    seed: SeedOpt = 0,
    ci: CiOpt = 0.95,
    huber_delta: DeltaOpt = HUBER_DELTA,
    isoflop_tol: TolOpt = 0.05,
    max_iter: MaxIterOpt = 500,
    force: ForceOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Tune small, extrapolate: pretrain every (size, budget) pair, then fit them all.

    Each run trains for budget / (6N) tokens (N: the model's non-embedding parameters), so each
    budget is an IsoFLOP group. Runs are kept under OUT/runs/; an interrupted sweep resumes.

    Example:

      llmctl scaling-fit sweep tokens/ --sizes 1x32,2x64,3x96 --budgets 1e11,3e11,1e12 --out sweeps/s1
      --pretrain-set preset=nano --pretrain-set seq_len=64 --pretrain-set device=cpu --budget 1e15
    """
    size_list = [s.strip() for s in sizes.split(",") if s.strip()]
    from .. import scaling

    budget_list = [scaling.parse_count(b) for b in budgets.split(",") if b.strip()]
    if not size_list or not budget_list:
        raise UsageError("sweep needs --sizes and --budgets, e.g. --sizes 2x64,4x128 --budgets 1e12,3e12")
    cfg = scaling.SweepConfig(
        tokens=str(tokens),
        out=str(out),
        sizes=size_list,
        budgets=budget_list,
        seed=seed,
        pretrain_set=list(pretrain_set or []),
        fit=_fit_config(None, out, None, budget, predict, bootstrap, bootstrap_starts, seed, ci, huber_delta,
                        isoflop_tol, max_iter, False),
        force=force,
    )
    _print(scaling.run_sweep(cfg), out)
