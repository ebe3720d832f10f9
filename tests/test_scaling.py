"""scaling-fit: the law fit recovers known parameters, reproduces Epoch AI's Chinchilla replication,
allocates compute by the closed form, finds IsoFLOP minima, and refuses bad input with one line."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA
from scipy.optimize import minimize

from llmctl import scaling
from llmctl.artifacts import StageRun
from llmctl.errors import UsageError

# The 245 points Epoch AI extracted from Chinchilla's Figure 4 (epoch-research/analyzing-chinchilla,
# data/svg_extracted_data.csv). That repository has no licence, so the file is not in this repository:
# it belongs in the team's shared data (../shared/data/scaling/), or LLMCTL_CHINCHILLA_CSV names it.
DATA = Path(os.environ.get("LLMCTL_CHINCHILLA_CSV") or SHARED_DATA / "scaling" / "chinchilla_points.csv")
HOFFMANN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def _synthetic(seed: int = 1, noise: float = 0.003, k: int = 8) -> scaling.Points:
    """A k×k grid of (N, D) with losses from the Hoffmann et al. law and multiplicative noise."""
    rng = np.random.default_rng(seed)
    N = np.repeat(np.geomspace(7e7, 1.6e10, k), k)
    D = np.tile(np.geomspace(5e9, 5e11, k), k)
    L = scaling.predict_loss(HOFFMANN, N, D) * np.exp(rng.normal(0, noise, N.size))
    return scaling.Points(N, D, L, [f"p{i}" for i in range(N.size)])


def _isoflop(seed: int = 2) -> scaling.Points:
    """Five compute budgets, seven model sizes each spread ×¼…×4 around the true optimum."""
    rng = np.random.default_rng(seed)
    N, D = [], []
    for C in (1e18, 3e18, 1e19, 3e19, 1e20):
        n_opt = scaling.compute_optimal(HOFFMANN, C)["N_opt"]
        for m in np.geomspace(0.25, 4, 7):
            N.append(n_opt * m)
            D.append(C / (6 * n_opt * m))
    N, D = np.array(N), np.array(D)
    L = scaling.predict_loss(HOFFMANN, N, D) * np.exp(rng.normal(0, 0.002, N.size))
    return scaling.Points(N, D, L, [f"p{i}" for i in range(N.size)])


def _write_csv(path: Path, N, D, L, header: str = "params,tokens,loss") -> Path:
    lines = [header] + [f"{float(n)!r},{float(d)!r},{float(lo)!r}" for n, d, lo in zip(N, D, L, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _sig2(x: float) -> float:
    return float(f"{x:.2g}")


# ------------------------------------------------------------------------------------------------
# the optimiser
# ------------------------------------------------------------------------------------------------
def test_grid_is_the_papers_full_grid():
    g = scaling.grid_starts()
    assert g.shape == (4500, 5)
    assert len({tuple(r) for r in g}) == 4500
    assert sorted(set(g[:, 3])) == [0.0, 0.5, 1.0, 1.5, 2.0]  # alpha
    assert sorted(set(g[:, 2])) == [-1.0, -0.5, 0.0, 0.5, 1.0]  # e
    assert sorted(set(g[:, 0])) == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]  # a


def test_gradient_matches_finite_differences():
    p = _synthetic()
    logN, logD, logL = np.log(p.N), np.log(p.D), np.log(p.L)
    rng = np.random.default_rng(0)
    theta = np.column_stack([rng.uniform(4, 8, 6), rng.uniform(4, 8, 6), rng.uniform(0, 1, 6),
                             rng.uniform(0.2, 0.5, 6), rng.uniform(0.2, 0.5, 6)])
    w = rng.integers(0, 3, (6, len(p))).astype(float)
    f, g = scaling.huber_objective(theta, logN, logD, logL, w)
    eps = 1e-6
    for k in range(5):
        d = np.zeros_like(theta)
        d[:, k] = eps
        fp, _ = scaling.huber_objective(theta + d, logN, logD, logL, w)
        fm, _ = scaling.huber_objective(theta - d, logN, logD, logL, w)
        np.testing.assert_allclose(g[:, k], (fp - fm) / (2 * eps), rtol=1e-4, atol=1e-9)
    # the objective is the plain Huber sum of REFERENCE.md
    a, b, e, al, be = theta[0]
    r = np.logaddexp(np.logaddexp(a - al * logN, b - be * logD), e) - logL
    h = np.where(np.abs(r) <= 1e-3, 0.5 * r**2, 1e-3 * (np.abs(r) - 0.5e-3))
    assert f[0] == pytest.approx(np.sum(w[0] * h), rel=1e-12)


def test_batched_starts_are_independent_and_match_scipy():
    """Each row of the batch reaches the same optimum scipy's L-BFGS-B reaches from that start alone."""
    p = _synthetic()
    logN, logD, logL = np.log(p.N), np.log(p.D), np.log(p.L)
    starts = scaling.grid_starts()[[17, 1210, 2333, 3999]]
    batch = scaling.batched_lbfgs(starts, logN, logD, logL)
    alone = scaling.batched_lbfgs(starts[2:3], logN, logD, logL)
    # no coupling, only rounding (numpy's SIMD reductions round differently with the batch size: 2e-7
    # relative on an AVX-512 CPU); a coupled row would move by far more
    np.testing.assert_allclose(alone.x[0], batch.x[2], rtol=1e-6)
    for i, x0 in enumerate(starts):
        ref = minimize(lambda t: scaling.huber_objective(t[None], logN, logD, logL)[0][0], x0,
                       jac=lambda t: scaling.huber_objective(t[None], logN, logD, logL)[1][0],
                       method="L-BFGS-B", options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12})
        assert batch.f[i] <= ref.fun * (1 + 1e-6), (i, batch.f[i], ref.fun)


# ------------------------------------------------------------------------------------------------
# approach 3: recovery and the Chinchilla replication
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_fit():
    p = _synthetic()
    return p, scaling.fit_law(p)


def test_recovers_known_parameters_with_intervals(synthetic_fit):
    p, fit = synthetic_fit
    assert fit.params["alpha"] == pytest.approx(HOFFMANN["alpha"], abs=0.015)
    assert fit.params["beta"] == pytest.approx(HOFFMANN["beta"], abs=0.015)
    assert fit.params["E"] == pytest.approx(HOFFMANN["E"], abs=0.02)
    assert fit.params["A"] == pytest.approx(HOFFMANN["A"], rel=0.25)
    assert fit.params["B"] == pytest.approx(HOFFMANN["B"], rel=0.25)
    boots = scaling.bootstrap(p, fit, 60, seed=3)
    assert np.isfinite(boots).all()
    again = scaling.bootstrap(p, fit, 60, seed=3)
    np.testing.assert_array_equal(boots, again)  # same seed, same intervals
    nat = [scaling.to_natural(b) for b in boots]
    for k in ("E", "alpha", "beta"):
        lo, hi = np.quantile([q[k] for q in nat], [0.025, 0.975])
        assert lo < HOFFMANN[k] < hi, k
        assert hi - lo > 0


def test_noise_free_points_are_fitted_exactly():
    p = _synthetic(noise=0.0, k=5)
    fit = scaling.fit_law(p)
    for k, v in HOFFMANN.items():
        assert fit.params[k] == pytest.approx(v, rel=2e-3), k


@pytest.mark.skipif(not DATA.is_file(), reason="Chinchilla points absent (../shared/data/scaling/chinchilla_points.csv)")
def test_chinchilla_points_reproduce_epoch_replication(tmp_path, llmctl):
    """Epoch AI's replication on the 240 points of Chinchilla's Figure 4 (REFERENCE.md).

    Epoch drops the five runs with the highest loss (their notebook keeps losses strictly below the
    fifth-largest) and fits the remaining 240; their grid fit printed A=477.84, B=2143.86,
    E=1.81724, α=0.34731, β=0.36718, and their reported estimates are E=1.82, A=482, B=2085,
    α=0.348, β=0.366.
    """
    rows = np.loadtxt(DATA, delimiter=",", comments="#", skiprows=4)
    assert rows.shape == (245, 4)
    N, D, L = rows[:, 0], rows[:, 1], rows[:, 3]
    keep = L < np.sort(L)[-5]
    assert keep.sum() == 240
    csv = _write_csv(tmp_path / "chin240.csv", N[keep], D[keep], L[keep])
    out = tmp_path / "fit"
    r = llmctl("scaling-fit", "--from-csv", csv, "--out", out, "--bootstrap", "40", "--seed", "1",
               "--budget", "5.76e23", "--predict", "70B,1.4T")
    assert r.code == 0, r.err
    res = json.loads((out / "results.json").read_text())
    p = {k: v["value"] for k, v in res["params"].items()}
    published = {"E": 1.82, "A": 482, "B": 2085, "alpha": 0.348, "beta": 0.366}
    for k, v in published.items():
        assert _sig2(p[k]) == _sig2(v), (k, p[k], v)
    grid_fit = {"E": 1.81724, "A": 477.84, "B": 2143.86, "alpha": 0.34731, "beta": 0.36718}
    for k, v in grid_fit.items():
        assert p[k] == pytest.approx(v, rel=1e-3), (k, p[k], v)
    assert res["n_points"] == 240 and res["starts"] == 4500
    for k, v in res["params"].items():
        assert v["ci_low"] < v["value"] < v["ci_high"], k
    # Epoch's bootstrap 95% interval for α is (0.317, 0.373): ours must be of that size and place
    assert 0.30 < res["params"]["alpha"]["ci_low"] < 0.335 < 0.36 < res["params"]["alpha"]["ci_high"] < 0.39
    (opt,) = res["compute_optimal"]
    assert opt["N_opt"]["value"] * opt["D_opt"]["value"] * 6 == pytest.approx(5.76e23, rel=1e-9)
    (pred,) = res["predictions"]
    assert pred["loss"]["value"] == pytest.approx(float(scaling.predict_loss(p, 70e9, 1.4e12)), rel=1e-9)
    assert (out / "scaling_fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "scaling-fit" and m["params"]["bootstrap"] == 40 and m["params"]["huber_delta"] == 1e-3
    assert "parameter" in r.out and "tokens/param" in r.out


# ------------------------------------------------------------------------------------------------
# compute-optimal allocation and approach 2
# ------------------------------------------------------------------------------------------------
def test_closed_form_is_the_constrained_minimum():
    for C in (1e19, 5.76e23):
        opt = scaling.compute_optimal(HOFFMANN, C)
        assert 6 * opt["N_opt"] * opt["D_opt"] == pytest.approx(C, rel=1e-12)
        n = np.geomspace(opt["N_opt"] / 3, opt["N_opt"] * 3, 20001)
        brute = n[np.argmin(scaling.predict_loss(HOFFMANN, n, C / (6 * n)))]
        assert brute == pytest.approx(opt["N_opt"], rel=1e-3)
        assert opt["tokens_per_param"] == pytest.approx(opt["D_opt"] / opt["N_opt"])


def test_isoflop_approach2_recovers_the_exponents():
    p = _isoflop()
    a2 = scaling.approach2(p, tol_decades=0.05)
    assert a2["available"] and a2["groups_used"] == 5
    true_a = HOFFMANN["beta"] / (HOFFMANN["alpha"] + HOFFMANN["beta"])
    assert a2["a"] == pytest.approx(true_a, abs=0.02)
    assert a2["b"] == pytest.approx(1 - true_a, abs=0.02)
    assert a2["a"] + a2["b"] == pytest.approx(1.0, abs=1e-9)  # D = C/6N within each group


def test_isoflop_groups_span_at_most_the_tolerance():
    """Runs 0.04 decades apart do not chain into one group: every group's runs are within --isoflop-tol."""
    lc = np.array([19.0, 19.04, 19.08, 19.12, 19.16, 20.0])
    N = np.full(lc.size, 1e8)
    p = scaling.Points(N, 10**lc / (6 * N), np.full(lc.size, 3.0), [f"p{i}" for i in range(lc.size)])
    assert [g.tolist() for g in scaling.isoflop_groups(p, 0.05)] == [[0, 1], [2, 3], [4], [5]]


def test_flat_or_underdetermined_points_are_flagged_not_reported_as_laws():
    p = _isoflop()
    flat = scaling.Points(p.N, p.D, np.full(p.N.size, 3.0), p.labels)
    a2 = scaling.approach2(flat, tol_decades=0.05)
    assert not a2["available"] and {g["reason"] for g in a2["groups"]} <= {"loss is flat in log N", "loss is not convex in log N"}
    res = scaling.analyse(flat, scaling.FitConfig(bootstrap=20, budget=[1e21]))
    assert any("losses barely vary" in n for n in res["notes"])
    # a coefficient past the float range is inf, not an OverflowError (a degenerate bootstrap resample)
    assert scaling.to_natural(np.array([800.0, 1.0, 0.5, 0.3, 0.3]))["A"] == math.inf
    # a well-determined law has no notes
    assert scaling.analyse(p, scaling.FitConfig(bootstrap=20, budget=[1e21]))["notes"] == []


def test_approach2_unavailable_without_isoflop_groups():
    a2 = scaling.approach2(_synthetic(), tol_decades=0.001)
    assert not a2["available"] and "need 2" in a2["reason"]


# ------------------------------------------------------------------------------------------------
# pretrain runs as input, rerun semantics
# ------------------------------------------------------------------------------------------------
def _fake_pretrain_run(path: Path, stats: dict) -> Path:
    """A finished pretrain artifact as the artifact contract writes it (manifest stats only)."""
    run = StageRun.open(path, "pretrain", {"n_layer": 1}, [])
    run.finish(stats)
    return path


def test_fit_from_pretrain_runs_and_rerun_is_noop(tmp_path, llmctl):
    p = _isoflop()
    runs = [
        _fake_pretrain_run(tmp_path / f"run{i}", {"non_embedding_params": float(n), "tokens_seen": int(d),
                                                   "final_val_loss": float(lo)})
        for i, (n, d, lo) in enumerate(zip(p.N[::2], p.D[::2], p.L[::2], strict=True))
    ]
    out = tmp_path / "fit"
    r = llmctl("scaling-fit", *runs, "--out", out, "--bootstrap", "10", "--budget", "1e21")
    assert r.code == 0, r.err
    res = json.loads((out / "results.json").read_text())
    assert res["n_points"] == len(runs)
    assert [pt["label"] for pt in res["points"]] == [f"run{i}" for i in range(len(runs))]
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["inputs"]) == len(runs)
    cfg = tmp_path / "fit.toml"
    cfg.write_text('bootstrap = 10\nbudget = ["1e21"]\n')  # the same options, given by --config
    r2 = llmctl("scaling-fit", *runs, "--out", out, "--config", cfg)
    assert r2.code == 0 and "already complete" in r2.out
    assert json.loads((out / "manifest.json").read_text())["created"] == m["created"]
    r3 = llmctl("scaling-fit", *runs, "--out", out, "--config", cfg, "--bootstrap", "11")  # command line wins
    assert r3.code == 2 and "--force" in r3.err
    r4 = llmctl("scaling-fit")
    assert r4.code == 0 and "sweep" in r4.out and "fit" in r4.out  # the group's help


def test_run_missing_stats_is_named(tmp_path, llmctl):
    good = [_fake_pretrain_run(tmp_path / f"r{i}", {"non_embedding_params": 1e6 * (i + 1), "tokens_seen": 1e8,
                                                     "final_val_loss": 3.0 - 0.1 * i}) for i in range(5)]
    bad = _fake_pretrain_run(tmp_path / "half", {"non_embedding_params": 1e6, "tokens_seen": 1e8})
    r = llmctl("scaling-fit", *good, bad, "--out", tmp_path / "fit")
    assert r.code == 2
    assert "half" in r.err and "final_val_loss" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "fit").exists()
    notrun = StageRun.open(tmp_path / "tok", "tokenize", {}, [])
    notrun.finish({})
    r = llmctl("scaling-fit", *good, tmp_path / "tok", "--out", tmp_path / "fit")
    assert r.code == 2 and "pretrain" in r.err


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
BAD_CSV = [
    ("params,loss\n1e6,3\n", "missing column(s) tokens"),
    ("params,tokens,loss\n1e6,1e8,3\n2e6,0,2.9\n", "not positive"),
    ("params,tokens,loss\n1e6,1e8,3\n-2e6,1e8,2.9\n", "not positive"),
    ("params,tokens,loss\n1e6,1e8,nan\n", "nan"),
    ("params,tokens,loss\n1e6,1e8,inf\n", "inf"),
    ("params,tokens,loss\n1e6,1e8,abc\n", "not a number"),
    ("params,tokens,loss\n1e300,1e10,3\n", "overflows the compute 6ND"),
    ("params,tokens,loss\n1e6,1e8,3\n2e6,1e8,2.9\n3e6,1e8,2.8\n4e6,1e8,2.7\n4e6,1e8,2.71\n", "at least 5"),
    ("params,tokens,loss\n1e6,1e8\n", "fields"),
    # one tokens-per-parameter ratio (a common "scale both" series): the fit is not identified
    ("params,tokens,loss\n1e6,2e7,4.0\n2e6,4e7,3.7\n4e6,8e7,3.45\n8e6,1.6e8,3.25\n1.6e7,3.2e8,3.1\n", "lies on one curve"),
    ("", "empty CSV"),
]


@pytest.mark.parametrize("body, needle", BAD_CSV)
def test_bad_csv_is_one_line_and_writes_nothing(tmp_path, body, needle):
    csv = tmp_path / "bad.csv"
    csv.write_text(body)
    with pytest.raises(UsageError) as e:
        scaling.run(scaling.FitConfig(from_csv=str(csv), out=str(tmp_path / "fit")))
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "fit").exists() and not list(tmp_path.glob(".fit*"))


def test_bad_input_exits_2_with_one_line(tmp_path, llmctl):
    csv = tmp_path / "bad.csv"
    csv.write_text(BAD_CSV[1][0])
    r = llmctl("scaling-fit", "--from-csv", csv, "--out", tmp_path / "fit")
    assert r.code == 2 and "not positive" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    r = llmctl("scaling-fit", "--from-csv", csv, "--predict", "1e9", "--out", tmp_path / "fit")
    assert r.code == 2 and "N,D" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path / "fit").exists()


def test_bad_options_are_usage_errors(tmp_path):
    p = _synthetic()
    csv = _write_csv(tmp_path / "ok.csv", p.N[:8], p.D[:8], p.L[:8])
    out = str(tmp_path / "fit")
    for cfg, needle in [
        (scaling.FitConfig(out=out), "either"),
        (scaling.FitConfig(out=out, from_csv=str(csv), runs=[str(tmp_path)]), "either"),
        (scaling.FitConfig(out=out, from_csv=str(csv), ci=1.5), "--ci"),
        (scaling.FitConfig(out=out, from_csv=str(tmp_path / "nope.csv")), "no such CSV"),
    ]:
        with pytest.raises(UsageError, match=re.escape(needle)):
            scaling.run(cfg)
    for text in ("-1e20", "abc", "0", "nan"):
        with pytest.raises(UsageError):
            scaling.parse_count(text)
    with pytest.raises(UsageError, match="N,D"):
        scaling.parse_predict("1e9")
    assert not (tmp_path / "fit").exists()


def test_extra_columns_and_comments_are_accepted(tmp_path):
    p = _synthetic()
    lines = ["# a comment", "name,loss,tokens,params"] + [
        f"r{i},{lo},{d},{n}" for i, (n, d, lo) in enumerate(zip(p.N, p.D, p.L, strict=True))
    ]
    (tmp_path / "x.csv").write_text("\n".join(lines) + "\n")
    got = scaling.read_csv(tmp_path / "x.csv")
    np.testing.assert_array_equal(got.N, p.N)
    np.testing.assert_array_equal(got.L, p.L)
    # a spreadsheet's "CSV UTF-8" starts with a byte-order mark
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "x.csv").read_bytes())
    np.testing.assert_array_equal(scaling.read_csv(tmp_path / "bom.csv").N, p.N)


def test_parse_count():
    assert scaling.parse_count("70B") == 70e9
    assert scaling.parse_count("1.4T") == 1.4e12
    assert scaling.parse_count("5.76e23") == 5.76e23
    assert scaling.parse_predict("7e9,140B") == (7e9, 140e9)
    assert math.isclose(scaling.parse_count("350m"), 3.5e8)


# ------------------------------------------------------------------------------------------------
# sweep
# ------------------------------------------------------------------------------------------------
def _tokens_artifact(root: Path, llmctl) -> Path:
    """A real tokenize-encode artifact of 40 KB of Shakespeare (or of made-up text without shared data)."""
    shared = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "corpora" / "tinyshakespeare.txt"
    if shared.is_file():
        text = shared.read_text(encoding="utf-8")[:40_000]
    else:
        rng = np.random.default_rng(0)
        words = "the of and to in a is that for it as was with be by on not he this are or his from".split()
        text = "\n\n".join(" ".join(rng.choice(words, 40)) + "." for _ in range(300))
    (root / "text.txt").write_text(text, encoding="utf-8")
    env = {"OMP_NUM_THREADS": "1"}
    r = llmctl("tokenize", "train", root / "text.txt", "--vocab-size", "400", "--out", root / "tok", env=env)
    assert r.code == 0, r.err
    r = llmctl("tokenize", "encode", root / "text.txt", "--tokenizer", root / "tok", "--out", root / "tokens",
               "--val-fraction", "0.1", env=env)
    assert r.code == 0, r.err
    return root / "tokens"


def test_sweep_rejects_bad_plans(tmp_path, llmctl):
    tok = StageRun.open(tmp_path / "tok", "tokenize-encode", {}, [])
    tok.finish({})
    base = {"tokens": str(tmp_path / "tok"), "out": str(tmp_path / "sw")}
    for over, needle in [
        ({"sizes": ["2x64"], "budgets": [1e12]}, "at least 5"),
        ({"sizes": ["2x6x4", "3x64"], "budgets": [1e12, 2e12, 3e12]}, "divisible"),
        ({"sizes": ["big"], "budgets": [1e12]}, "LAYERSxD_MODEL"),
        ({"sizes": ["2x64"], "budgets": []}, "--budgets"),
        ({"sizes": ["1x64", "2x64", "3x64"], "budgets": [1e12, 2e12], "tokens": str(tmp_path / "nope")}, "nope"),
        ({"sizes": ["1x64", "2x64", "3x64"], "budgets": [1e12, 2e12], "pretrain_set": ["seed=3"]}, "sets seed itself"),
        ({"sizes": ["1x64", "2x64", "3x64"], "budgets": [1e12, 2e12], "pretrain_set": ["seq_len"]}, "KEY=VALUE"),
    ]:
        with pytest.raises(UsageError, match=re.escape(needle)):
            scaling.run_sweep(scaling.SweepConfig(**(base | over)))
    r = llmctl("scaling-fit", "sweep", tmp_path / "tok", "--sizes", "2x64", "--out", tmp_path / "sw")
    assert r.code == 2 and "--budgets" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "sw").exists()


def test_sweep_plan():
    assert scaling.approx_non_embedding_params(2, 64) == 12 * 2 * 64 * 64
    assert scaling.parse_size("4x128") == (4, 128, 2)
    assert scaling.parse_size("4x128x4") == (4, 128, 4)
    assert scaling.parse_size("1x32") == (1, 32, 1)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llmctl.train.pretrain") is None, reason="the pretrain stage is absent")
def test_sweep_trains_real_runs_then_fits_them(tmp_path, llmctl):
    """Five real pretrain runs (2 sizes × 3 budgets but one), each a few optimizer steps, then the fit."""
    tokens = _tokens_artifact(tmp_path, llmctl)
    out = tmp_path / "sweep"
    sets = ["preset=nano", "seq_len=32", "micro_batch=4", "warmup_steps=2", "precision='fp32'", "device=cpu",
            "eval_batches=2"]
    args = ["scaling-fit", "sweep", tokens, "--sizes", "1x16,1x32", "--budgets", "2e8,4e8,8e8", "--out", out,
            "--bootstrap", "0", "--budget", "1e12", *[a for kv in sets for a in ("--pretrain-set", kv)]]
    r = llmctl(*args, env={"OMP_NUM_THREADS": "1"})
    assert r.code == 0, r.err
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 6
    res = json.loads((out / "results.json").read_text())
    assert res["n_points"] == 6
    by_label = {pt["label"]: pt for pt in res["points"]}
    for run in runs:
        st = json.loads((run / "manifest.json").read_text())["stats"]
        pt = by_label[f"runs/{run.name}"]
        assert (pt["params"], pt["tokens"], pt["loss"]) == (
            st["non_embedding_params"], st["tokens_seen"], st["final_val_loss"])
        planned = float(run.name.split("-C")[1]) / (6 * st["non_embedding_params"])
        assert planned - 1 <= st["tokens_seen"] < planned + 4 * 32  # stops within one step of its budget
    a2 = res["approach2"]
    assert a2["grouping"].startswith("by design") and len(a2["groups"]) == 3
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "scaling-fit" and m["params"]["sizes"] == ["1x16", "1x32"]
    r2 = llmctl(*args)
    assert r2.code == 0 and "already complete" in r2.out


def test_cli_default_huber_delta_is_the_library_default():
    from llmctl.cli import scaling_fit

    assert scaling_fit.HUBER_DELTA == scaling.HUBER_DELTA
