"""Pseudo-Voigt fits of Bragg peak windows, turned into pixel labels.

Each accepted peak gets a small window (9x9 by default) fitted with a 2-D pseudo-Voigt

    amp * [(1 - eta) * G(sigma_x, sigma_y) + eta * L(gamma_x, gamma_y)] + c + a*(x-xc) + b*(y-yc)

on a planar background with :mod:`lmfit`.  Residuals are weighted by the inverse Poisson standard
deviation in the data's own units, ``1/sqrt(g |data| + g^2)`` for data in ADU at ``g`` ADU per
photon (:attr:`Window.gain`; the ``g^2`` is a one-photon floor for empty pixels), so the bright
core does not dominate the fit; masked and off-panel pixels are simply left out, and the reduced
chi-square (plus a few sanity checks) decides whether the fit is trusted.  Why the gain: with the
photon weights ``1/sqrt(|data| + 1)`` applied to ADU, a perfect fit has a reduced chi-square of
about ``g`` (30 on a CSPAD), so every bright spot failed ``redchi_max`` and became background.  A
trusted fit becomes a binary label: pixels where the profile *without background* reaches half of
its maximum on the window grid.

Speed matters because a run fits millions of windows: the model and its analytic Jacobian are
vectorised numpy over the valid pixels only (the exponentials shared between the residual and the
Jacobian at the same point), the initial guess comes from moments of the window, parameters are
bounded and ``max_nfev`` is modest.  The solver is lmfit's bounded Levenberg-Marquardt (MINPACK)
through its public API: ``scipy.optimize.least_squares`` takes the same analytic Jacobian, but its
bounded trust-region reflective method spends more Python per iteration than MINPACK on these
11-parameter, ~80-pixel problems (``benchmarks/bench_pvoigt_fit.py`` measures both: 211 vs 149
fits per CPU-second on 201 simulated windows, centres agreeing to 0.06 px at the 95th percentile),
and its unbounded ``lm`` lets ``eta`` leave [0, 1] in a fifth of the fits.  Plain lmfit (finite
differences, default tolerances and ``max_nfev``: 21 fits per CPU-second in the same run) is
:func:`fit_window_baseline`, the benchmark's baseline.

Coordinates: windows carry the panel-relative, 0-based pixel-centre position of their element
``[0, 0]`` (``fs0``, ``ss0``), so a fitted centre is directly a panel coordinate.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Fit outcome codes (stored as int8 in label files; names in the file's ``fit_status`` attribute).
STATUS = ("ok", "too_few_pixels", "no_convergence", "centre_outside", "redchi", "weak", "error")
STATUS_CODE = {name: i for i, name in enumerate(STATUS)}

PARAM_NAMES = ("amp", "x0", "y0", "sigma_x", "sigma_y", "gamma_x", "gamma_y", "eta",
               "bg_c", "bg_a", "bg_b")

#: One row per attempted fit: where, what came out, and whether it became a label.
FIT_DTYPE = np.dtype(
    [("panel", np.int32), ("fs_guess", np.float64), ("ss_guess", np.float64)]
    + [(name, np.float64) for name in PARAM_NAMES]
    + [("redchi", np.float64), ("snr", np.float64), ("nfev", np.int32), ("npix", np.int32),
       ("nlabel", np.int32), ("status", np.int8)]
)

FIT_DEFAULTS: dict[str, Any] = {
    "window": 9,          # side of the square window in pixels (odd)
    "max_nfev": 200,      # function evaluations per fit
    "redchi_max": 5.0,    # reject fits whose weighted reduced chi-square exceeds this
    "min_snr": 5.0,       # reject fits whose integrated signal-to-noise is below this
    "max_shift": 2.0,     # reject fits whose centre moved further than this from the guess (px)
    "min_pixels": 20,     # fewer valid pixels than this: not fitted
    "label_fraction": 0.5,  # label pixels where the profile reaches this fraction of its max
    "prescreen_snr": 2.0,  # windows whose 3x3 core is below this SNR are not fitted (0: off)
    "tolerance": 1e-5,    # relative ftol/xtol of Levenberg-Marquardt (centres to ~1e-3 px)
}


@dataclass
class Window:
    """A cut-out of one panel around one peak; ``valid`` is False for masked/off-panel pixels."""

    data: np.ndarray          # float64 (h, w)
    valid: np.ndarray         # bool (h, w)
    fs0: int                  # panel fs of data[:, 0]
    ss0: int                  # panel ss of data[0, :]
    fs_guess: float           # where the peak is expected (panel coordinates)
    ss_guess: float
    panel: int = 0
    gain: float = 1.0         # ADU per photon of ``data`` (1: data in photons): the noise model


@dataclass
class FitOutcome:
    """The result of fitting one window: parameters, statistics, status and the label mask."""

    row: np.ndarray                      # one FIT_DTYPE record
    label: np.ndarray | None = None      # bool (h, w) on the window grid; None unless status ok
    fs0: int = 0
    ss0: int = 0
    message: str = ""

    @property
    def status(self) -> str:
        return STATUS[int(self.row["status"])]

    @property
    def ok(self) -> bool:
        return int(self.row["status"]) == STATUS_CODE["ok"]


@dataclass
class _Problem:
    """Flattened valid pixels of a window: what the residual and Jacobian close over."""

    x: np.ndarray
    y: np.ndarray
    data: np.ndarray
    weight: np.ndarray
    xc: float
    yc: float
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------- windows


def extract_windows(
    image: np.ndarray,
    valid: np.ndarray | None,
    fs: Sequence[float] | np.ndarray,
    ss: Sequence[float] | np.ndarray,
    size: int = 9,
    panel: int = 0,
    gain: float = 1.0,
) -> list[Window]:
    """Cut ``size x size`` windows centred on the nearest pixel to each ``(fs, ss)``.

    Windows at panel edges are clipped to the panel rather than zero-padded (padding would look
    like a dark background to the fit); a centre off the panel gives an empty window, which the
    fitter reports as ``too_few_pixels`` instead of crashing.  ``gain``: the panel's ADU per
    photon, which each window carries to its fit (wherever that runs) for the noise model.
    """
    if size < 3 or size % 2 == 0:
        raise ValueError(f"window size must be odd and >= 3, got {size}")
    if not gain > 0:
        raise ValueError(f"gain must be a positive number of ADU per photon, got {gain}")
    height, width = image.shape
    half = size // 2
    good = np.ones(image.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    windows = []
    for pfs, pss in zip(np.asarray(fs, dtype=float), np.asarray(ss, dtype=float), strict=True):
        cfs = int(np.floor(pfs + 0.5)) if np.isfinite(pfs) else -10**6
        css = int(np.floor(pss + 0.5)) if np.isfinite(pss) else -10**6
        f0, f1 = max(cfs - half, 0), min(cfs + half + 1, width)
        s0, s1 = max(css - half, 0), min(css + half + 1, height)
        if f1 <= f0 or s1 <= s0:
            f0 = f1 = min(max(cfs, 0), width)
            s0 = s1 = min(max(css, 0), height)
        data = np.asarray(image[s0:s1, f0:f1], dtype=np.float64)
        ok = good[s0:s1, f0:f1] & np.isfinite(data)
        windows.append(Window(data=data, valid=ok, fs0=f0, ss0=s0, fs_guess=float(pfs),
                              ss_guess=float(pss), panel=panel, gain=float(gain)))
    return windows


# ------------------------------------------------------------------------------ model, jacobian


def profile(p: Sequence[float], x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """Peak profile without background, plus the Gaussian and Lorentzian parts (each max 1)."""
    amp, x0, y0, sx, sy, gx, gy, eta = p[:8]
    dx, dy = x - x0, y - y0
    dx2, dy2 = dx * dx, dy * dy
    gauss = np.exp(dx2 * (-0.5 / (sx * sx)) + dy2 * (-0.5 / (sy * sy)))
    lorentz = 1.0 / (1.0 + dx2 * (1.0 / (gx * gx)) + dy2 * (1.0 / (gy * gy)))
    return amp * ((1.0 - eta) * gauss + eta * lorentz), gauss, lorentz, dx, dy


def model(p: Sequence[float], x: np.ndarray, y: np.ndarray, xc: float, yc: float,
          parts: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """Full model: profile plus the plane ``c + a*(x-xc) + b*(y-yc)``."""
    peak = (parts or profile(p, x, y))[0]
    return peak + (p[8] + p[9] * (x - xc) + p[10] * (y - yc))


def jacobian(p: Sequence[float], x: np.ndarray, y: np.ndarray, xc: float, yc: float,
             parts: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """Analytic d(model)/d(parameter), shape (n_pixels, 11), columns in PARAM_NAMES order."""
    amp, _x0, _y0, sx, sy, gx, gy, eta = p[:8]
    _, gauss, lorentz, dx, dy = parts or profile(p, x, y)
    ga = (amp * (1.0 - eta)) * gauss
    la = (amp * eta * 2.0) * (lorentz * lorentz)
    gax, gay = ga * dx, ga * dy
    lax, lay = la * dx, la * dy
    jac = np.empty((x.size, 11))
    jac[:, 0] = (1.0 - eta) * gauss + eta * lorentz
    jac[:, 1] = gax * (1.0 / (sx * sx)) + lax * (1.0 / (gx * gx))
    jac[:, 2] = gay * (1.0 / (sy * sy)) + lay * (1.0 / (gy * gy))
    jac[:, 3] = gax * dx * (1.0 / sx**3)
    jac[:, 4] = gay * dy * (1.0 / sy**3)
    jac[:, 5] = lax * dx * (1.0 / gx**3)
    jac[:, 6] = lay * dy * (1.0 / gy**3)
    jac[:, 7] = amp * (lorentz - gauss)
    jac[:, 8] = 1.0
    jac[:, 9] = x - xc
    jac[:, 10] = y - yc
    return jac


#: lmfit's own parameter names: the centre is fitted as an offset from the guess, so every bound
#: is the same for every window and one Parameters template serves a whole process.
_LMFIT_NAMES = ("amp", "dx0", "dy0", "sigma_x", "sigma_y", "gamma_x", "gamma_y", "eta",
                "bg_c", "bg_a", "bg_b")
_TEMPLATES: dict[int, Any] = {}


def _values(params: Any, prob: _Problem) -> list[float]:
    values = [params[name].value for name in _LMFIT_NAMES]
    values[1] += prob.xc
    values[2] += prob.yc
    return values


def _parts(values: list[float], prob: _Problem) -> tuple[np.ndarray, ...]:
    """Profile pieces at ``values``, remembered: Levenberg-Marquardt asks for the Jacobian at the
    point whose residual it has just computed, so the exponentials are evaluated once."""
    key = tuple(values[:8])
    if prob.extra.get("key") != key:
        prob.extra["key"], prob.extra["parts"] = key, profile(values, prob.x, prob.y)
    return prob.extra["parts"]


def _residual(params: Any, prob: _Problem) -> np.ndarray:
    values = _values(params, prob)
    full = model(values, prob.x, prob.y, prob.xc, prob.yc, _parts(values, prob))
    return (full - prob.data) * prob.weight


def _dfun(params: Any, prob: _Problem) -> np.ndarray:
    # d/d(dx0) == d/d(x0), so the Jacobian of the absolute model serves the offset parameters
    values = _values(params, prob)
    jac = jacobian(values, prob.x, prob.y, prob.xc, prob.yc, _parts(values, prob))
    return jac * prob.weight[:, None]


# ------------------------------------------------------------------------------- initial guess


def noise_variance(data: np.ndarray, gain: float) -> np.ndarray:
    """Poisson variance of pixel values in ADU at ``gain`` ADU per photon: ``g |data| + g^2``.

    ``|data| / g`` photons have a variance of as many photons squared, ``g^2`` ADU^2 each; the
    ``g^2`` is a one-photon floor, so that an empty or negative (pedestal-subtracted) pixel still
    has a finite weight.  At ``g = 1`` this is the photon-counting ``|data| + 1``.
    """
    return gain * (np.abs(data) + gain)


def _problem(win: Window) -> _Problem:
    ss_idx, fs_idx = np.nonzero(win.valid)
    data = win.data[ss_idx, fs_idx]
    x = fs_idx + float(win.fs0)
    y = ss_idx + float(win.ss0)
    weight = 1.0 / np.sqrt(noise_variance(data, float(win.gain)))
    return _Problem(x=x, y=y, data=data, weight=weight, xc=float(win.fs_guess),
                    yc=float(win.ss_guess))


def initial_guess(prob: _Problem, size: int) -> list[float]:
    """Moments of the window: background from the dimmest third, centre and widths from the rest.

    A good start is what lets a modest ``max_nfev`` converge; the guessed centre is the
    background-subtracted centroid of the pixels near the expected position.
    """
    order = np.sort(prob.data)
    bg = float(np.median(order[: max(len(order) // 3, 1)]))
    signal = np.clip(prob.data - bg, 0.0, None)
    near = (np.abs(prob.x - prob.xc) <= 2.5) & (np.abs(prob.y - prob.yc) <= 2.5)
    weights = signal * near
    total = float(weights.sum())
    if total <= 0:
        x0, y0, sx, sy = prob.xc, prob.yc, 1.0, 1.0
    else:
        x0 = float((weights * prob.x).sum() / total)
        y0 = float((weights * prob.y).sum() / total)
        sx = float(np.sqrt((weights * (prob.x - x0) ** 2).sum() / total))
        sy = float(np.sqrt((weights * (prob.y - y0) ** 2).sum() / total))
    wmax = size / 2.0
    sx, sy = float(np.clip(sx, 0.5, wmax)), float(np.clip(sy, 0.5, wmax))
    amp = max(float((prob.data[near] - bg).max()) if near.any() else 0.0, 1e-3)
    return [amp, x0, y0, sx, sy, 1.18 * sx, 1.18 * sy, 0.5, bg, 0.0, 0.0]


def _template(size: int) -> Any:
    """Bounded lmfit Parameters for a window of this size, built once per process (it is slow)."""
    import lmfit

    if size not in _TEMPLATES:
        half = size / 2.0
        bounds = {"amp": (0.0, np.inf), "dx0": (-half, half), "dy0": (-half, half),
                  "sigma_x": (0.25, half), "sigma_y": (0.25, half),
                  "gamma_x": (0.25, half), "gamma_y": (0.25, half), "eta": (0.0, 1.0)}
        params = lmfit.Parameters()
        for name in _LMFIT_NAMES:
            lo, hi = bounds.get(name, (-np.inf, np.inf))
            params.add(name, value=0.0 if lo == -np.inf else (lo + min(hi, lo + 1.0)) / 2, min=lo,
                       max=hi)
        _TEMPLATES[size] = params
    return _TEMPLATES[size]


def _parameters(guess: list[float], prob: _Problem, size: int) -> Any:
    """The template with this window's starting values (the setter clips them into bounds).

    lmfit's ``prepare_fit`` deep-copies the parameters, so sharing the template is safe.
    """
    params = _template(size)
    start = list(guess)
    start[1] -= prob.xc
    start[2] -= prob.yc
    for name, value in zip(_LMFIT_NAMES, start, strict=True):
        params[name].value = float(value)
    return params


# ------------------------------------------------------------------------------------- fitting


def _empty_row(win: Window) -> np.ndarray:
    row = np.zeros((), dtype=FIT_DTYPE)
    for name in PARAM_NAMES + ("redchi", "snr"):
        row[name] = np.nan
    row["panel"], row["fs_guess"], row["ss_guess"] = win.panel, win.fs_guess, win.ss_guess
    row["npix"] = int(win.valid.sum())
    return row


def fit_window(win: Window, config: dict[str, Any] | None = None) -> FitOutcome:
    """Fit one window; never raises (a failure is an outcome with a status and a message)."""
    cfg = {**FIT_DEFAULTS, **(config or {})}
    row = _empty_row(win)
    n_params = len(PARAM_NAMES)
    if row["npix"] < max(int(cfg["min_pixels"]), n_params + 1):
        row["status"] = STATUS_CODE["too_few_pixels"]
        return FitOutcome(row, fs0=win.fs0, ss0=win.ss0, message=f"{int(row['npix'])} valid pixels")
    try:
        if float(cfg["prescreen_snr"]) > 0:
            row["snr"] = prescreen_snr(win)
            if not row["snr"] >= float(cfg["prescreen_snr"]):
                row["status"] = STATUS_CODE["weak"]
                return FitOutcome(row, fs0=win.fs0, ss0=win.ss0, message="no signal: not fitted")
        return _fit(win, row, cfg)
    except Exception as exc:  # a bad window must never stop a run; it is recorded instead
        row["status"] = STATUS_CODE["error"]
        return FitOutcome(row, fs0=win.fs0, ss0=win.ss0, message=f"{type(exc).__name__}: {exc}")


def prescreen_snr(win: Window) -> float:
    """A quick signal-to-noise of the 3x3 core against the window's background.

    Many predicted reflections are not visible at all (recall of real frames is often < 20%);
    skipping them before lmfit saves most of the time a run would spend fitting noise.  The
    background is the package's one estimator (sigma-clipped mean and std,
    :func:`peaknet_xtal.finding.peaks.robust_background`): median and MAD would describe only
    the read noise of a photon-counting background where most pixels hold no photon.
    """
    from peaknet_xtal.finding.peaks import robust_background

    data = win.data[win.valid]
    bg, noise = robust_background(data)
    noise = noise if noise > 0 else float(np.sqrt(abs(bg) + 1.0))
    ss_idx, fs_idx = np.nonzero(win.valid)
    near = ((np.abs(fs_idx + win.fs0 - win.fs_guess) <= 1.5)
            & (np.abs(ss_idx + win.ss0 - win.ss_guess) <= 1.5))
    if not near.any():
        return 0.0
    return float((data[near] - bg).sum() / (noise * np.sqrt(near.sum())))


def _fit(win: Window, row: np.ndarray, cfg: dict[str, Any]) -> FitOutcome:
    import lmfit

    size = int(cfg["window"])
    prob = _problem(win)
    params = _parameters(initial_guess(prob, size), prob, size)
    minimizer = lmfit.Minimizer(_residual, params, fcn_args=(prob,), nan_policy="propagate",
                                max_nfev=int(cfg["max_nfev"]))
    tol = float(cfg["tolerance"])
    result = minimizer.leastsq(Dfun=_dfun, col_deriv=0, ftol=tol, xtol=tol)
    best = _values(result.params, prob)
    for name, value in zip(PARAM_NAMES, best, strict=True):
        row[name] = value
    resid = np.asarray(result.residual)
    dof = max(resid.size - len(PARAM_NAMES), 1)
    row["redchi"] = float((resid**2).sum() / dof)
    row["nfev"] = int(result.nfev)
    label = label_mask(best, win, float(cfg["label_fraction"]))
    row["snr"] = integrated_snr(best, win, label, resid / prob.weight)
    row["status"] = _judge(result.success, best, row, win, cfg)
    outcome = FitOutcome(row, fs0=win.fs0, ss0=win.ss0, message=str(result.message))
    if outcome.ok:
        outcome.label = label
        row["nlabel"] = int(label.sum())
    return outcome


def integrated_snr(best: Sequence[float], win: Window, label: np.ndarray,
                   raw_residual: np.ndarray) -> float:
    """Signal-to-noise of the peak integrated over its label pixels.

    Signal: the background-free profile summed over the label; noise: the per-pixel scatter of
    the fit residuals times sqrt(label size).  Unit-free (ADU or photons alike), and what decides
    whether a predicted reflection is really visible rather than a fit to noise.
    """
    n = int(label.sum())
    rms = float(np.sqrt(np.mean(raw_residual**2))) if raw_residual.size else 0.0
    if n == 0 or rms <= 0:
        return float("nan")
    height, width = win.data.shape
    yy, xx = np.mgrid[win.ss0:win.ss0 + height, win.fs0:win.fs0 + width].astype(np.float64)
    signal = float(profile(best, xx, yy)[0][label].sum())
    return signal / (rms * np.sqrt(n))


def _judge(success: bool, best: list[float], row: np.ndarray, win: Window,
           cfg: dict[str, Any]) -> int:
    """Decide whether a converged fit describes a real peak we can trust as a label."""
    shift = np.hypot(best[1] - win.fs_guess, best[2] - win.ss_guess)
    if not success:
        return STATUS_CODE["no_convergence"]
    if shift > float(cfg["max_shift"]):
        return STATUS_CODE["centre_outside"]
    if not row["redchi"] <= float(cfg["redchi_max"]):
        return STATUS_CODE["redchi"]
    if not row["snr"] >= float(cfg["min_snr"]):
        return STATUS_CODE["weak"]
    return STATUS_CODE["ok"]


def label_mask(best: Sequence[float], win: Window, fraction: float = 0.5) -> np.ndarray:
    """Pixels where the background-free profile reaches ``fraction`` of its max on the grid.

    The max is taken on the pixel grid (not the analytic peak height) so a narrow peak centred
    between pixels still labels its brightest pixel.  Invalid pixels are never labelled.
    """
    height, width = win.data.shape
    yy, xx = np.mgrid[win.ss0:win.ss0 + height, win.fs0:win.fs0 + width].astype(np.float64)
    peak = profile(best, xx, yy)[0]
    peak_max = float(peak[win.valid].max()) if win.valid.any() else 0.0
    if peak_max <= 0:
        return np.zeros(win.data.shape, dtype=bool)
    return (peak >= fraction * peak_max) & win.valid


def fit_windows(windows: Iterable[Window],
                config: dict[str, Any] | None = None) -> list[FitOutcome]:
    """Fit windows one after another in this process (what a worker does with its share)."""
    return [fit_window(win, config) for win in windows]


def outcomes_table(outcomes: Sequence[FitOutcome]) -> np.ndarray:
    """Stack the outcome records into one FIT_DTYPE array."""
    if not outcomes:
        return np.zeros(0, dtype=FIT_DTYPE)
    return np.stack([o.row for o in outcomes])


def paint_labels(shape: tuple[int, int], outcomes: Iterable[FitOutcome]) -> np.ndarray:
    """OR the label masks of the trusted fits into one panel-sized uint8 array."""
    labels = np.zeros(shape, dtype=np.uint8)
    for outcome in outcomes:
        if outcome.label is None:
            continue
        h, w = outcome.label.shape
        region = labels[outcome.ss0:outcome.ss0 + h, outcome.fs0:outcome.fs0 + w]
        region |= outcome.label.astype(np.uint8)
    return labels


# ------------------------------------------------------------------------------------ baseline


def fit_window_baseline(win: Window, config: dict[str, Any] | None = None) -> Any:
    """Plain lmfit, the benchmark's baseline: the same model, bounds and start as
    :func:`fit_window`, with lmfit's defaults for everything else (finite-difference Jacobian,
    default tolerances and ``max_nfev``, parameter uncertainties computed).
    """
    import lmfit

    size = int({**FIT_DEFAULTS, **(config or {})}["window"])
    prob = _problem(win)
    params = _parameters(initial_guess(prob, size), prob, size)
    return lmfit.minimize(_residual, params, args=(prob,), method="leastsq")


def synthetic_window(
    params: Sequence[float],
    size: int = 9,
    *,
    fs0: int = 0,
    ss0: int = 0,
    rng: np.random.Generator | None = None,
    poisson: bool = True,
    gain: float = 1.0,
) -> Window:
    """A window drawn from the model itself (with Poisson noise): known truth for tests/benchmarks.

    ``params`` are in PARAM_NAMES order with ``x0``/``y0`` in panel coordinates; the plane is
    referenced to the window centre, which is also the guessed position.  ``gain``: ADU per
    photon, as a detector records them: the model is the expected ADU, photons are drawn from
    it over ``gain`` and recorded as ``gain`` ADU each (the window says so, for its fit).
    """
    yy, xx = np.mgrid[ss0:ss0 + size, fs0:fs0 + size].astype(np.float64)
    xc, yc = fs0 + size // 2, ss0 + size // 2
    expected = model(params, xx, yy, xc, yc)
    if poisson:
        rng = rng if rng is not None else np.random.default_rng(0)
        data = gain * rng.poisson(np.clip(expected, 0.0, None) / gain).astype(np.float64)
    else:
        data = expected
    return Window(data=data, valid=np.ones(data.shape, dtype=bool), fs0=fs0, ss0=ss0,
                  fs_guess=float(xc), ss_guess=float(yc), gain=float(gain))
