"""The detector as the simulator needs it: panel planes in metres, ray casting, per-pixel maps.

Built from any :class:`peaknet_xtal.formats.geometry.Geometry`.  Geometry files often leave the
camera length or the photon energy to an HDF5 path (read per frame at the facility); the simulator
then uses its configured defaults, which is why :class:`DetectorModel` takes ``default_clen_m``.

Panel pixel ``(pfs, pss)`` (0-based pixel-centre coordinates) sits at
``corner + (pfs + 0.5) * fs + (pss + 0.5) * ss`` in the CrystFEL lab frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class DetectorModel:
    """Panel planes (metres, CrystFEL lab frame) plus lazily built per-pixel geometry maps."""

    geometry: Any
    origins: np.ndarray  # (n, 3) lab position of each panel's outer corner (pixel corner 0,0)
    fs_vecs: np.ndarray  # (n, 3) metres per +1 fs pixel
    ss_vecs: np.ndarray  # (n, 3) metres per +1 ss pixel
    shapes: list[tuple[int, int]]  # (height, width) per panel
    clen_m: float
    _maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    #: Other per-detector constants reused across frames (panel frames for ray casting, the
    #: reachable resolution, background maps per beam setting); see :meth:`cached`.
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_geometry(cls, geometry: Any, default_clen_m: float = 0.1) -> DetectorModel:
        """Each panel's plane from the geometry's one placement model
        (:meth:`~peaknet_xtal.formats.geometry.Geometry.panel_planes`); panels without a
        numeric clen get :meth:`~peaknet_xtal.formats.geometry.Geometry.default_clen`."""
        origins, fs_vecs, ss_vecs = geometry.panel_planes(default_clen_m=default_clen_m)
        shapes = [(int(p.max_ss - p.min_ss + 1), int(p.max_fs - p.min_fs + 1))
                  for p in geometry.panels]
        return cls(geometry, origins, fs_vecs, ss_vecs, shapes,
                   float(geometry.default_clen(default_clen_m)))

    @property
    def n_panels(self) -> int:
        return len(self.shapes)

    @property
    def n_pixels(self) -> int:
        return int(sum(h * w for h, w in self.shapes))

    @property
    def offsets(self) -> np.ndarray:
        """Start of each panel in the concatenated flat pixel buffer."""
        sizes = [h * w for h, w in self.shapes]
        return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

    def pixel_centre_lab(self, panel: np.ndarray, fs: np.ndarray, ss: np.ndarray) -> np.ndarray:
        """Lab position (metres) of panel-relative 0-based pixel-centre coordinates."""
        panel = np.asarray(panel, dtype=np.int64)
        return (self.origins[panel] + (np.asarray(fs)[:, None] + 0.5) * self.fs_vecs[panel]
                + (np.asarray(ss)[:, None] + 0.5) * self.ss_vecs[panel])

    def cast(self, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where rays from the sample along ``directions`` (n, 3) meet the detector.

        Returns ``(panel, fs, ss)`` with 0-based pixel-centre coordinates; ``panel`` is -1 for rays
        that miss every panel (gaps, outside).  Overlapping panels: the nearest one wins.  All
        panels are intersected at once (an (n, panels) problem) with per-panel frames built once.
        """
        u = np.asarray(directions, dtype=float)
        n = len(u)
        out_p = np.full(n, -1, dtype=np.int64)
        out_fs = np.full(n, np.nan)
        out_ss = np.full(n, np.nan)
        if n == 0:
            return out_p, out_fs, out_ss
        normals, plane, dual_fs, dual_ss, width, height = self._panel_frames()
        denom = u @ normals.T  # (n, panels)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            t = plane[None, :] / denom
            # point = t u - origin, projected on the dual axes: a = t (u . d) - origin . d
            a = t * (u @ dual_fs.T) - (self.origins * dual_fs).sum(axis=1)[None, :]
            b = t * (u @ dual_ss.T) - (self.origins * dual_ss).sum(axis=1)[None, :]
            hit = (t > 0) & (a >= 0) & (a < width) & (b >= 0) & (b < height)
        t = np.where(hit, t, np.inf)
        best = np.argmin(t, axis=1)  # first of equals, as the panel-by-panel loop chose
        rows = np.arange(n)
        found = np.isfinite(t[rows, best])
        out_p[found] = best[found]
        out_fs[found] = a[rows, best][found] - 0.5
        out_ss[found] = b[rows, best][found] - 0.5
        return out_p, out_fs, out_ss

    def _panel_frames(self) -> tuple[np.ndarray, ...]:
        """Per panel: normal, origin . normal, the dual fs and ss axes, width and height."""
        frames = self._cache.get("panel_frames")
        if frames is None:
            normals = np.cross(self.fs_vecs, self.ss_vecs)
            plane = np.einsum("ij,ij->i", self.origins, normals)
            duals = np.linalg.inv(np.stack([self.fs_vecs, self.ss_vecs, normals], axis=2))
            shape = np.array(self.shapes, dtype=float)
            frames = (normals, plane, duals[:, 0, :], duals[:, 1, :], shape[:, 1], shape[:, 0])
            self._cache["panel_frames"] = frames
        return frames

    def cached(self, key: Any, build: Any, keep: int = 4) -> Any:
        """``build()``, remembered under ``key`` (the newest ``keep`` entries of its kind).

        Frame-invariant work (background for one beam setting, masks) is done once per run instead
        of once per frame; the bound keeps randomised configs from growing the cache.
        """
        value = self._cache.get(key)
        if value is not None:
            return value
        kind = key[0] if isinstance(key, tuple) else key
        # A snapshot and pop(): frames simulated in threads may share this model.
        same = [k for k in list(self._cache) if isinstance(k, tuple) and k and k[0] == kind]
        for old in same[:max(len(same) - keep + 1, 0)]:
            self._cache.pop(old, None)
        value = build()
        self._cache[key] = value
        return value

    def maps(self) -> dict[str, np.ndarray]:
        """Flat per-pixel maps over all panels (float32), built once per detector.

        ``sin_theta`` (for 1/d at any wavelength), ``cos2theta``, ``phi`` (azimuth), ``solid``
        (relative solid angle: incidence cosine / distance^2, 1 at the pixel that sees most),
        ``polar_x`` (sin^2 2theta cos^2 phi) and ``sin2t_sq`` for the polarisation factor,
        ``radius_px`` (distance from the beam axis in pixels), its components ``x_px`` and
        ``y_px``, and ``two_theta`` (so frames need no per-pixel trigonometry).
        """
        if "sin_theta" in self._maps:
            return self._maps
        xyz = []
        for origin, fvec, svec, (height, width) in zip(self.origins, self.fs_vecs, self.ss_vecs,
                                                       self.shapes, strict=False):
            ss_i, fs_i = np.mgrid[0:height, 0:width]
            pos = (origin[None, None, :] + (fs_i[..., None] + 0.5) * fvec
                   + (ss_i[..., None] + 0.5) * svec)
            xyz.append(pos.reshape(-1, 3))
        pos = np.concatenate(xyz)
        dist = np.linalg.norm(pos, axis=1)
        cos2t = pos[:, 2] / dist
        rxy = np.hypot(pos[:, 0], pos[:, 1])
        two_theta = np.arctan2(rxy, pos[:, 2])
        phi = np.arctan2(pos[:, 1], pos[:, 0])
        normals = np.concatenate([
            np.repeat(np.cross(f, s)[None, :] / np.linalg.norm(np.cross(f, s)), h * w, axis=0)
            for f, s, (h, w) in zip(self.fs_vecs, self.ss_vecs, self.shapes, strict=False)])
        incidence = np.abs(np.einsum("ij,ij->i", pos, normals)) / dist
        solid = incidence / dist ** 2
        solid /= solid.max()
        pixel_m = np.linalg.norm(self.fs_vecs, axis=1)
        radius_px = rxy / np.repeat(pixel_m, [h * w for h, w in self.shapes])
        self._maps = {
            "sin_theta": np.sin(two_theta / 2).astype(np.float32),
            "cos2theta": cos2t.astype(np.float32),
            "phi": phi.astype(np.float32),
            "solid": solid.astype(np.float32),
            "polar_x": ((np.sin(two_theta) * np.cos(phi)) ** 2).astype(np.float32),
            "sin2t_sq": (np.sin(two_theta) ** 2).astype(np.float32),
            "radius_px": radius_px.astype(np.float32),
            "x_px": (radius_px * np.cos(phi)).astype(np.float32),
            "y_px": (radius_px * np.sin(phi)).astype(np.float32),
            "two_theta": two_theta.astype(np.float32),
        }
        return self._maps

    def max_sin_theta(self) -> float:
        """Largest sin(theta) any pixel sees (sets the highest reachable resolution)."""
        if "max_sin_theta" not in self._cache:
            self._cache["max_sin_theta"] = self._max_sin_theta()
        return float(self._cache["max_sin_theta"])

    def _max_sin_theta(self) -> float:
        corners = []
        for origin, fvec, svec, (height, width) in zip(self.origins, self.fs_vecs, self.ss_vecs,
                                                       self.shapes, strict=False):
            for a, b in ((0, 0), (width, 0), (0, height), (width, height)):
                corners.append(origin + a * fvec + b * svec)
        pos = np.array(corners)
        two_theta = np.arctan2(np.hypot(pos[:, 0], pos[:, 1]), pos[:, 2])
        return float(np.sin(two_theta.max() / 2))

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        """Per-panel (height, width) views of a flat per-pixel buffer."""
        out, start = [], 0
        for height, width in self.shapes:
            out.append(flat[start:start + height * width].reshape(height, width))
            start += height * width
        return out

