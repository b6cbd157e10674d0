"""The statistics of a study: seed-level intervals, paired differences, scaling-law fits.

The unit of replication is the seed (initialisation and data order): evaluation noise
(the per-window standard error) is reported beside it but is not what the intervals are
made of, because at small scale training-trajectory noise dominates.  Intervals are
two-sided 95 % Student-t intervals over seeds; differences between arms are paired by seed
(the arms of a seed share initialisation and data order, so their noise partly cancels).
"""
from __future__ import annotations

import math


def _scipy():
    try:
        import scipy.optimize
        import scipy.stats
    except ImportError:
        raise RuntimeError("study statistics need scipy: pip install -e '.[study]'") from None
    return scipy


def t_quantile(df: int, level: float = 0.95) -> float:
    return float(_scipy().stats.t.ppf(0.5 + level / 2, df))


def summary(xs, level: float = 0.95) -> dict:
    """n, mean, median, sample sd and the t-interval of the mean (None where n is too small).
    The median is there because one diverged seed moves a small-sample mean a long way."""
    xs = [float(x) for x in xs]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "median": None, "sd": None, "ci": None}
    mean = math.fsum(xs) / n
    srt = sorted(xs)
    median = srt[n // 2] if n % 2 else (srt[n // 2 - 1] + srt[n // 2]) / 2
    if n < 2:
        return {"n": 1, "mean": mean, "median": median, "sd": None, "ci": None}
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1, level) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "median": median, "sd": sd, "ci": [mean - half, mean + half]}


def paired_difference(a: dict, b: dict) -> dict:
    """``a[seed] - b[seed]`` over the seeds both have: the summary plus sign counts."""
    seeds = sorted(set(a) & set(b))
    d = {s: a[s] - b[s] for s in seeds}
    out = summary(list(d.values()))
    out["per_seed"] = d
    out["positive"] = sum(v > 0 for v in d.values())
    out["negative"] = sum(v < 0 for v in d.values())
    out["zero"] = sum(v == 0 for v in d.values())
    return out


def power_law(x, a, alpha, e):
    return a * x ** (-alpha) + e


def fit_power_law(xs, ys, sigma=None) -> dict | None:
    """L(x) = A x^-alpha + E by weighted least squares; standard errors from the covariance
    (None with exactly three points: the fit is then exact and has no error estimate)."""
    import numpy as np

    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if len(xs) < 3:
        return None
    scale = float(xs.min())  # fit in x / min(x): keeps A near the losses' size
    e0 = float(ys.min()) * 0.9
    p0 = (float(ys.max() - e0), 0.3, e0)
    try:
        p, cov = _scipy().optimize.curve_fit(power_law, xs / scale, ys, p0=p0, sigma=sigma,
                                             absolute_sigma=sigma is not None, maxfev=20000,
                                             bounds=([0, 0, 0], [np.inf, 5, np.inf]))
    except (RuntimeError, ValueError) as e:
        return {"error": str(e).splitlines()[0]}
    a, alpha, e = (float(v) for v in p)
    err = [float(math.sqrt(c)) if len(xs) > 3 and math.isfinite(c) and c >= 0 else None for c in np.diag(cov)]
    return {"A": a * scale ** alpha, "alpha": alpha, "E": e,
            "stderr": {"A": None if err[0] is None else err[0] * scale ** alpha, "alpha": err[1], "E": err[2]}}


def effective_ratio(ref_fit: dict, xs, ys, sigma=None) -> dict | None:
    """The factor r with L_arm(x) = A (r x)^-alpha + E under the reference's (A, alpha, E):
    an arm worth r times its parameters (or tokens) of the reference (the effective-parameter
    form of the low-precision scaling laws of Kumar et al. 2024 and Quartet).  One parameter,
    so two sweep points suffice; its standard error is from the fit's covariance."""
    import numpy as np

    if not ref_fit or "error" in ref_fit:
        return None
    a, alpha, e = ref_fit["A"], ref_fit["alpha"], ref_fit["E"]
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if len(xs) < 2 or alpha <= 0:
        return None

    def model(x, log_r):
        return a * (np.exp(log_r) * x) ** (-alpha) + e

    try:
        p, cov = _scipy().optimize.curve_fit(model, xs, ys, p0=(0.0,), sigma=sigma,
                                             absolute_sigma=sigma is not None)
    except (RuntimeError, ValueError) as err:
        return {"error": str(err).splitlines()[0]}
    r = float(math.exp(p[0]))
    se_log = float(math.sqrt(cov[0, 0])) if math.isfinite(cov[0, 0]) else None
    return {"ratio": r, "stderr": None if se_log is None else r * se_log,
            "ci": None if se_log is None else [r * math.exp(-1.96 * se_log), r * math.exp(1.96 * se_log)]}
