"""What real detectors add to a simulated panel: strong smooth backgrounds and their look-alikes.

Why: a finder trained on clean photon-counting frames meets, on real data, backgrounds thousands
of ADU high with large gradients (kapton arcs and shadows, solvent and ice rings), read-out noise
blurred by the point-spread function (neighbouring pixels correlated), cosmic-ray zingers, liquid
jet streaks and saturated spots.  Each function here adds one of these to a 2-D panel, in units of
the panel's background noise ``sigma`` (so it serves any gain), draws everything from ``rng``, and
never changes the peak label: these are exactly the things that must not become peaks (or, for
saturation, peaks that must stay peaks).  ``training.data.Augment`` applies them to training crops;
``strong_background_panel`` builds the strong-background Rayonix acceptance set's frames;
``noise_blobs`` makes correlated-noise blobs at weak-spot height away from the labelled peaks.
``drowned_peaks`` says which labelled peaks a strong background (``strong_background_parts``,
``strong_background_panel_parts``) has drowned, for a caller that chooses to unlabel them
(``drowned_strong_peaks``: at the simulation's strong cut, as the evaluations ask it), and
``drowned_reflections`` which simulated reflections sit on them.
"""
from __future__ import annotations

import numpy as np
from scipy.special import expit  # the logistic step of a shadow edge, without overflow


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], level: float,
                 gradient: float) -> np.ndarray:
    """A smooth positive background: ``level`` on average, a ramp of up to ``gradient`` per
    pixel, and with equal chances an arc (kapton/ice ring segment), a shadow edge or nothing."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (xx - w / 2) + np.sin(angle) * (yy - h / 2)) * gradient
    field = level + ramp
    kind = int(rng.integers(3))
    if kind == 0:  # ring or arc through the panel: centre outside, radius comparable to the panel
        cy, cx = rng.uniform(-2, 3) * h, rng.uniform(-2, 3) * w
        r = np.hypot(yy - cy, xx - cx)
        r0 = float(np.quantile(r, rng.uniform(0.2, 0.8)))
        width = rng.uniform(3, 30)
        field = field + level * rng.uniform(0.2, 1.5) * np.exp(-0.5 * ((r - r0) / width) ** 2)
    elif kind == 1:  # a soft shadow edge (kapton tape, nozzle)
        edge = np.cos(angle + 1.0) * (xx - rng.uniform(0, w)) + np.sin(angle + 1.0) * (
            yy - rng.uniform(0, h))
        field = field * (1 - rng.uniform(0.3, 0.8) * expit(edge / rng.uniform(1, 8)))
    return np.maximum(field, 0.0)


def correlated_noise(rng: np.random.Generator, shape: tuple[int, int],
                     psf_sigma: float) -> np.ndarray:
    """Unit-variance Gaussian noise blurred by a Gaussian point-spread of ``psf_sigma`` pixels
    (0.5-1 px gives the ~0.3-0.5 neighbour correlation of CCD read-outs)."""
    from scipy.ndimage import gaussian_filter

    noise = rng.normal(0.0, 1.0, shape)
    if psf_sigma > 0:
        noise = gaussian_filter(noise, psf_sigma)
    return noise / max(float(noise.std()), 1e-12)


def add_strong_background(image: np.ndarray, sigma: float, rng: np.random.Generator,
                          max_level: float = 100.0) -> np.ndarray:
    """Add a smooth background up to ``max_level`` x ``sigma`` high with a large gradient, and
    the shot noise it brings (std ~ sqrt(level) sigma), spatially correlated."""
    return strong_background_parts(image, sigma, rng, max_level)[0]


def strong_background_parts(image: np.ndarray, sigma: float, rng: np.random.Generator,
                            max_level: float = 100.0) -> tuple[np.ndarray, np.ndarray, float]:
    """``add_strong_background`` that also returns what it added: the per-pixel std of its noise
    and that noise's point spread (px), so that a caller can tell which spots it drowned
    (``drowned_peaks``).  Same random draws, in the same order, as ``add_strong_background``."""
    level = float(np.exp(rng.uniform(np.log(3.0), np.log(max_level)))) * sigma
    gradient = level * rng.uniform(0, 2.0) / max(image.shape)
    shape = (int(image.shape[0]), int(image.shape[1]))
    field = smooth_field(rng, shape, level, gradient)
    noise_scale = sigma * np.sqrt(field / sigma) * rng.uniform(0.3, 1.0)
    psf = float(rng.uniform(0.0, 1.0))
    noise = correlated_noise(rng, shape, psf) * noise_scale
    return image + field + noise, noise_scale, psf


def drowned_peaks(image: np.ndarray, label: np.ndarray, sigma: float, noise_scale: np.ndarray,
                  psf: float, min_snr: float, ring: int = 3) -> np.ndarray:
    """The labelled pixels of the peaks (8-connected components of ``label``) whose expected
    significance on a strong background falls below ``min_snr``: a boolean mask to clear.

    Why: a weak spot under a strong background with correlated noise is no longer distinguishable
    from a blob of that noise; keeping its label teaches a model to call noise-level blobs.  The
    significance of a component S is its background-subtracted sum in ``image`` (the crop before
    the strong background; background: the median of the unlabelled pixels in a ``ring`` px wide
    band around S) over the std of that sum's noise: the crop's own (``sigma`` per pixel,
    uncorrelated) plus the added noise, ``noise_scale`` per pixel blurred by a Gaussian point
    spread ``psf`` and renormalised to that std (as ``correlated_noise`` does), whose sum over S
    has variance ||G * (1_S noise_scale)||^2 / ||G||^2 exactly.  Expected, not realised: it uses
    no random draws and does not depend on the noise that happened to fall on the spot.
    """
    from scipy.ndimage import binary_dilation, find_objects, gaussian_filter
    from scipy.ndimage import label as components

    label = label.astype(bool)
    drop = np.zeros(label.shape, dtype=bool)
    if not label.any():
        return drop
    labelled, _ = components(label, structure=np.ones((3, 3), dtype=bool))
    if psf > 0:
        delta = np.zeros((int(8 * psf) * 2 + 3,) * 2)
        delta[delta.shape[0] // 2, delta.shape[1] // 2] = 1.0
        kernel_norm = float(np.sum(gaussian_filter(delta, psf) ** 2))
    image = np.asarray(image, dtype=np.float64)
    scale = np.asarray(noise_scale, dtype=np.float64)
    # each spot within a window that holds its band and the whole point spread of its noise
    # (gaussian_filter's reach: 4 sigma), so that a detector panel costs its spots, not its size
    margin = max(ring, int(4.0 * psf + 0.5)) + 2
    height, width = label.shape
    for k, (ys, xs) in enumerate(find_objects(labelled), start=1):
        window = (slice(max(ys.start - margin, 0), min(ys.stop + margin, height)),
                  slice(max(xs.start - margin, 0), min(xs.stop + margin, width)))
        spot = labelled[window] == k
        band = binary_dilation(spot, iterations=ring) & ~label[window]
        part = image[window]
        background = float(np.median(part[band])) if band.any() else 0.0
        signal = float(np.sum(part[spot] - background))
        weighted = np.where(spot, scale[window], 0.0)
        if psf > 0:
            added = float(np.sum(gaussian_filter(weighted, psf) ** 2)) / kernel_norm
        else:
            added = float(np.sum(weighted ** 2))
        noise = np.sqrt(spot.sum() * sigma ** 2 + added)
        if signal < min_snr * noise:
            drop[window] |= spot
    return drop


def drowned_strong_peaks(before: np.ndarray, label: np.ndarray, good: np.ndarray | None,
                        noise_scale: np.ndarray, psf: float) -> np.ndarray:
    """``drowned_peaks`` as every evaluation asks it: the labelled pixels of a simulated panel
    whose spots a strong background drowned, below the simulation's own strong cut
    (``SimConfig.strong_snr``), with the panel's noise before that background measured as the
    std of its unlabelled ``good`` pixels (all unlabelled pixels if ``good`` is None).

    ``before``: the panel as simulated (ADU), ``noise_scale`` and ``psf``: what
    ``strong_background_parts`` or ``strong_background_panel_parts`` return with the new panel.
    """
    from peaknet_xtal.sim.config import SimConfig

    before = np.asarray(before, dtype=np.float64)
    label = np.asarray(label, dtype=bool)
    quiet = ~label if good is None else ~label & np.asarray(good, dtype=bool)
    sigma = float(np.std(before[quiet])) if quiet.any() else 0.0
    return drowned_peaks(before, label, sigma, noise_scale, psf, SimConfig().strong_snr)


def drowned_reflections(reflections: np.ndarray, drowned: list[np.ndarray]) -> np.ndarray:
    """Which ``reflections`` (``sim.simulate.REFLECTION_DTYPE`` rows) a strong background has
    drowned: a bool per row, true where a pixel within 1 px of its centre is in its panel's
    ``drowned`` mask (``drowned_peaks`` of that panel).

    Why: the simulation flags a reflection strong against the background it simulated; a
    background added afterwards can bury it, and an evaluation that still counts it as strong
    charges every finder with a reflection no finder could see.  Callers keep drowned
    reflections as true reflections (finding one is not a false peak) but stop counting them
    as strong.
    """
    gone = np.zeros(len(reflections), dtype=bool)
    for j, row in enumerate(reflections):
        mask = drowned[int(row["panel"])]
        y, x = int(row["ss"]), int(row["fs"])
        gone[j] = bool(mask[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].any())
    return gone


def noise_blobs(rng: np.random.Generator, label: np.ndarray, sigma: float,
                psf: tuple[float, float] = (0.5, 1.0), peak: tuple[float, float] = (4.0, 10.0),
                clear: tuple[float, float] = (2.0, 4.0)) -> np.ndarray:
    """A field of correlated-noise blobs to add to a crop as hard negatives (labels unchanged).

    Why: on a strong smooth background with correlated noise, blobs of spot size reach the height
    of the weak spots a finder must still find, and a model that has seen weak spots only in
    uncorrelated noise calls them.  This field is Gaussian noise blurred by a point spread drawn
    from ``psf`` (px; 0.5-1 gives blobs about 1-3 px wide), scaled so that its tallest blob,
    where it applies, is ``peak`` (drawn) times ``sigma`` high, and faded to zero near labelled
    pixels (zero within ``clear[0]`` px of one, full beyond ``clear[1]``) so that the real spots
    keep their own profile and stay labelled: the model sees the blobs, with the noise's own
    spatial texture, only where the label is empty.
    """
    from scipy.ndimage import distance_transform_edt

    shape = (int(label.shape[0]), int(label.shape[1]))
    field = correlated_noise(rng, shape, float(rng.uniform(*psf)))
    if label.any():
        distance = distance_transform_edt(~label.astype(bool))
        weight = np.clip((distance - clear[0]) / max(clear[1] - clear[0], 1e-9), 0.0, 1.0)
    else:
        weight = np.ones(shape)
    full = weight >= 1.0
    tallest = float(field[full].max()) if full.any() else 0.0
    if tallest <= 0:
        return np.zeros(shape)
    return field * weight * (float(rng.uniform(*peak)) * sigma / tallest)


def add_zinger(image: np.ndarray, sigma: float, rng: np.random.Generator,
               counting: bool = False) -> None:
    """A cosmic-ray track in place: a short straight line, 3-10 px, tens to thousands of sigma.

    ``counting``: the track as a photon-counting detector (Pilatus, Eiger) records it, one count
    (``sigma``, the ADU of one photon) in each pixel it crosses.  Such a pixel counts pulses
    above its energy threshold, one per particle, whatever charge the particle leaves, where an
    integrating detector (CCD, CSPAD, JUNGFRAU) adds up that charge.  The same random draws
    either way, so that a caller's later draws do not depend on it.
    """
    h, w = image.shape
    length = rng.uniform(3, 10)
    angle = rng.uniform(0, np.pi)
    y0, x0 = rng.uniform(0, h), rng.uniform(0, w)
    t = np.linspace(0, length, int(length * 2) + 2)
    ys = np.clip((y0 + t * np.sin(angle)).astype(int), 0, h - 1)
    xs = np.clip((x0 + t * np.cos(angle)).astype(int), 0, w - 1)
    height = np.exp(rng.uniform(np.log(20), np.log(2000))) * sigma
    if counting:
        track = np.zeros(image.shape, dtype=bool)
        track[ys, xs] = True
        image[track] += sigma
    else:
        image[ys, xs] += height


def add_jet_streak(image: np.ndarray, sigma: float, rng: np.random.Generator) -> None:
    """A liquid-jet streak in place: a long thin line across the panel, 1-3 px wide, fading."""
    from scipy.ndimage import gaussian_filter

    h, w = image.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    dist = np.abs(-np.sin(angle) * (xx - cx) + np.cos(angle) * (yy - cy))
    along = np.cos(angle) * (xx - cx) + np.sin(angle) * (yy - cy)
    width = rng.uniform(0.4, 1.5)
    amplitude = np.exp(rng.uniform(np.log(3), np.log(100))) * sigma
    fade = np.exp(-np.abs(along) / rng.uniform(20, 400))
    bumps = 1 + 0.5 * gaussian_filter(rng.normal(size=(h, w)), 2.0) * 4
    image += amplitude * np.exp(-0.5 * (dist / width) ** 2) * fade * np.clip(bumps, 0.2, 2)


def saturate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Clip at a saturation level below the brightest pixels (flat-topped spots stay spots)."""
    top = float(np.max(image))
    floor = float(np.quantile(image, 0.999))
    if top <= floor:
        return image
    return np.minimum(image, floor + (top - floor) * rng.uniform(0.1, 0.7))


def strong_background_panel(photons: np.ndarray, rng: np.random.Generator,
                            adu_per_photon: float, level_adu: tuple[float, float] = (2500, 3800),
                            noise_at_3000: float = 33.0, psf_sigma: float = 0.6) -> np.ndarray:
    """A panel as the MFX Rayonix hit of issue 14 shows it: ``photons`` (spots, already Poisson)
    times the gain, on a smooth 2,500-3,800 ADU background with large gradients and an arc, and
    noise ~ 33 ADU at 3,000 ADU (scaling as sqrt(level)) blurred to neighbour correlation ~0.4."""
    return strong_background_panel_parts(photons, rng, adu_per_photon, level_adu, noise_at_3000,
                                         psf_sigma)[0]


def strong_background_panel_parts(photons: np.ndarray, rng: np.random.Generator,
                                  adu_per_photon: float,
                                  level_adu: tuple[float, float] = (2500, 3800),
                                  noise_at_3000: float = 33.0, psf_sigma: float = 0.6
                                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """``strong_background_panel`` that also returns the per-pixel std (ADU) of the noise it
    added and that noise's point spread (px), so that a caller can tell which spots it drowned
    (``drowned_peaks``).  Same random draws and the same panel."""
    h, w = photons.shape
    lo, hi = level_adu
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h) / np.sqrt(2)
    cy, cx = rng.uniform(-1, 2) * h, rng.uniform(-1, 2) * w
    arc = np.exp(-0.5 * ((np.hypot(yy - cy, xx - cx) - rng.uniform(0.3, 1.0) * max(h, w))
                         / rng.uniform(20, 80)) ** 2)
    field = lo + (hi - lo) * np.clip(0.5 + ramp, 0, 1) * 0.8 + (hi - lo) * 0.4 * arc
    root = np.sqrt(field / 3000.0)
    noise = correlated_noise(rng, (h, w), psf_sigma) * noise_at_3000 * root
    return photons * adu_per_photon + field + noise, noise_at_3000 * root, psf_sigma
