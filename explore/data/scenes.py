"""Procedural, class-labelled landscape scenes for training small diffusion models offline.

A scene is one row of `SceneParams`; all randomness lives there (`sample_params`).
`render` is a deterministic function of the params and the output size: geometry
and texture are functions of continuous coordinates in [0, 1]^2 (x to the right,
y downwards), edges are anti-aliased analytically (coverage = clip(distance / pixel
width + 1/2)), and texture octaves finer than ~2 pixels fade to their mean. So a
32 px render is close to a box-downscaled 128 px render of the same params, and
the 128 px render holds real detail the 32 px one cannot show.

    params = sample_params(np.random.default_rng(0), labels)   # all randomness
    low, high = render(params, 32), render(params, 128)         # same scenes
    crop = render_region(params, 128, top, left, 32, 32)        # only a window

Each class has one sampler (`_sample_<class>`) and one painter (`_paint_<class>`);
a batch is rendered class by class, vectorised over the scenes of a class.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator, NamedTuple

import numpy as np
import torch

CLASS_NAMES = (
    "alpine",
    "desert",
    "sunset_ocean",
    "night_sky",
    "forest",
    "snowfield",
    "volcano",
    "lake",
)
NUM_CLASSES = len(CLASS_NAMES)

N_LAYERS = 3  # ridge layers per scene (far to near)
N_OCTAVES = 6  # sine octaves per ridge layer
N_OBJECTS = 16  # object slots (plume puffs, lava streams, cacti)
N_CLOUDS = 8  # cloud blob slots
N_COLORS = 8  # palette slots, meaning fixed per class (see the *_COLORS tables)
N_KNOBS = 8  # class-specific scalars, unpacked by name in each painter

TAU = np.float32(2 * np.pi)


def class_names() -> tuple[str, ...]:
    """The scene class names, index = label."""
    return CLASS_NAMES


@dataclass
class SceneParams:
    """Everything random about a batch of scenes; one row per scene."""

    labels: np.ndarray  # [N] int64 class index into CLASS_NAMES
    seed: np.ndarray  # [N] uint32 seed of the hashed texture / star / tree lattices
    sky: np.ndarray  # [N, 3, 3] sky colour at the top, middle and horizon
    palette: np.ndarray  # [N, N_COLORS, 3] class colours, order in the class's *_COLORS table
    horizon: np.ndarray  # [N] y where the sky gradient ends (water line, ground line)
    ridges: np.ndarray  # [N, N_LAYERS, N_OCTAVES, 3] amplitude, frequency (cycles/unit), phase
    ridge_y: np.ndarray  # [N, N_LAYERS] base line y of each ridge layer
    sun: np.ndarray  # [N, 4] sun / moon x, y, radius, aux (moon phase offset)
    objects: np.ndarray  # [N, N_OBJECTS, 4] x, y, size, aux; size 0 = slot unused
    clouds: np.ndarray  # [N, N_CLOUDS, 4] x, y, half-width, half-height; width 0 = unused
    knobs: np.ndarray  # [N, N_KNOBS] class-specific scalars, named in each painter

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx) -> "SceneParams":
        """Rows `idx` (index array, boolean mask or slice) as a new SceneParams."""
        return SceneParams(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @staticmethod
    def concat(parts: list["SceneParams"]) -> "SceneParams":
        """Rows of several SceneParams, in order."""
        return SceneParams(
            **{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(SceneParams)}
        )


# ----------------------------------------------------------------------------
# Palettes: base colours per class; every scene jitters them (see _palette).

ALPINE_COLORS = dict(
    rock_far=(0.50, 0.56, 0.70),
    rock_near=(0.36, 0.36, 0.42),
    snow=(0.96, 0.97, 1.00),
    meadow=(0.32, 0.56, 0.20),
    tree=(0.08, 0.26, 0.12),
    cloud=(1.00, 1.00, 1.00),
)
DESERT_COLORS = dict(
    mesa=(0.80, 0.52, 0.38),
    dune_far=(0.95, 0.78, 0.52),
    dune_mid=(0.92, 0.66, 0.38),
    dune_near=(0.86, 0.55, 0.28),
    sun=(1.00, 0.98, 0.85),
    cactus=(0.24, 0.42, 0.20),
)
SUNSET_COLORS = dict(
    sun=(1.00, 0.88, 0.55),
    sea_far=(0.45, 0.25, 0.35),
    sea_near=(0.08, 0.07, 0.20),
    cloud_lit=(1.00, 0.62, 0.45),
    cloud_dark=(0.40, 0.20, 0.35),
    island=(0.10, 0.05, 0.12),
)
NIGHT_COLORS = dict(
    moon=(0.97, 0.95, 0.82),
    hills_far=(0.05, 0.07, 0.14),
    hills_near=(0.01, 0.015, 0.03),
    star=(1.00, 0.97, 0.90),
    milky=(0.55, 0.55, 0.75),
)
FOREST_COLORS = dict(
    row_far=(0.40, 0.55, 0.48),
    row_mid=(0.17, 0.38, 0.20),
    row_near=(0.08, 0.25, 0.11),
    ground=(0.30, 0.33, 0.13),
    trunk=(0.30, 0.20, 0.12),
    front=(0.04, 0.16, 0.07),
)
SNOW_COLORS = dict(
    far=(0.78, 0.82, 0.92),
    snow_lit=(0.98, 0.98, 1.00),
    snow_shade=(0.72, 0.80, 0.95),
    tree=(0.15, 0.25, 0.22),
    sun=(1.00, 0.98, 0.92),
)
VOLCANO_COLORS = dict(
    cone=(0.20, 0.14, 0.13),
    hills=(0.10, 0.07, 0.08),
    lava=(1.00, 0.42, 0.05),
    lava_core=(1.00, 0.85, 0.30),
    smoke=(0.42, 0.40, 0.42),
    smoke_lit=(0.85, 0.40, 0.20),
)
LAKE_COLORS = dict(
    mountain=(0.45, 0.55, 0.68),
    snow=(0.95, 0.96, 1.00),
    hills=(0.20, 0.42, 0.25),
    tree=(0.07, 0.22, 0.10),
    water=(0.10, 0.28, 0.40),
    shore=(0.55, 0.50, 0.38),
    cloud=(1.00, 1.00, 1.00),
)


# ----------------------------------------------------------------------------
# Sampling: one function per class, each returns the fields it uses.


def _u(rng, n, lo, hi, shape=()):
    return rng.uniform(lo, hi, (n, *shape)).astype(np.float32)


def _palette(rng, n, table: dict, jitter=0.04, tint=0.06):
    """Base colours with a per-scene colour grade (tint) and per-colour jitter."""
    base = np.array(list(table.values()), np.float32)
    out = np.zeros((n, N_COLORS, 3), np.float32)
    grade = 1 + tint * rng.standard_normal((n, 1, 3))
    out[:, : len(base)] = base[None] * grade + jitter * rng.standard_normal((n, len(base), 3))
    return np.clip(out, 0, 1)


def _sky(rng, n, top, mid, horizon, jitter=0.05):
    base = np.array([top, mid, horizon], np.float32)
    grade = 1 + 0.06 * rng.standard_normal((n, 1, 3))
    return np.clip(base[None] * grade + jitter * rng.standard_normal((n, 3, 3)), 0, 1).astype(np.float32)


def _golden_hour(rng, n, scene: dict, prob: float):
    """Turn a random fraction `prob` of the scenes to evening light: warm sky, warm-tinted colours (in place)."""
    amount = _u(rng, n, 0.4, 1.0) * (rng.random(n) < prob)
    golden = _sky(rng, n, (0.30, 0.33, 0.60), (0.88, 0.62, 0.55), (1.00, 0.80, 0.52))
    scene["sky"] = scene["sky"] + amount[:, None, None] * (golden - scene["sky"])
    warm = np.array([0.08, -0.08, -0.25], np.float32)
    scene["palette"] = np.clip(scene["palette"] * (1 + amount[:, None, None] * warm), 0, 1)
    return scene


def _octaves(rng, n, f0, amp, gain=0.5, lacunarity=2.0):
    """[n, N_OCTAVES, 3] sine octaves: amplitude, frequency (cycles/unit), phase."""
    k = np.arange(N_OCTAVES, dtype=np.float32)
    freq = f0[:, None] * lacunarity**k * _u(rng, n, 0.8, 1.25, (N_OCTAVES,))
    amps = amp[:, None] * gain**k * _u(rng, n, 0.5, 1.5, (N_OCTAVES,))
    phase = _u(rng, n, 0, TAU, (N_OCTAVES,))
    return np.stack([amps, freq, phase], -1)


def _clouds(rng, n, count_max, y_lo, y_hi, w_lo, w_hi, aspect_lo, aspect_hi):
    """Cloud blobs; a random number (0..count_max) of slots is used per scene."""
    c = np.zeros((n, N_CLOUDS, 4), np.float32)
    count = rng.integers(0, count_max + 1, n)
    used = np.arange(N_CLOUDS)[None] < count[:, None]
    c[..., 0] = _u(rng, n, -0.1, 1.1, (N_CLOUDS,))
    c[..., 1] = _u(rng, n, y_lo, y_hi, (N_CLOUDS,))
    c[..., 2] = _u(rng, n, w_lo, w_hi, (N_CLOUDS,)) * used
    c[..., 3] = c[..., 2] * _u(rng, n, aspect_lo, aspect_hi, (N_CLOUDS,))
    return c


def _sample_alpine(rng, n):
    ridges = np.stack(
        [
            _octaves(rng, n, _u(rng, n, 1.0, 2.0), _u(rng, n, 0.10, 0.16), gain=0.45),
            _octaves(rng, n, _u(rng, n, 0.8, 1.6), _u(rng, n, 0.10, 0.16), gain=0.45),
            _octaves(rng, n, _u(rng, n, 0.5, 1.0), _u(rng, n, 0.02, 0.04), gain=0.4),
        ],
        1,
    )
    ridge_y = np.stack([_u(rng, n, 0.50, 0.60), _u(rng, n, 0.64, 0.74), _u(rng, n, 0.80, 0.88)], 1)
    knobs = np.zeros((n, N_KNOBS), np.float32)
    knobs[:, 0] = _u(rng, n, 0.35, 0.65)  # snowline, as a fraction of the layer's peak height
    knobs[:, 1] = _u(rng, n, 0.0, 0.7)  # tree density on the meadow
    knobs[:, 2] = _u(rng, n, 0.03, 0.06)  # tree spacing
    scene = dict(
        sky=_sky(rng, n, (0.18, 0.38, 0.78), (0.42, 0.62, 0.90), (0.78, 0.86, 0.96)),
        palette=_palette(rng, n, ALPINE_COLORS),
        horizon=ridge_y[:, 1],
        ridges=ridges,
        ridge_y=ridge_y,
        clouds=_clouds(rng, n, 4, 0.08, 0.35, 0.04, 0.12, 0.25, 0.45),
        knobs=knobs,
    )
    return _golden_hour(rng, n, scene, 0.3)


def _sample_desert(rng, n):
    ridges = np.stack(
        [
            _octaves(rng, n, _u(rng, n, 0.6, 1.2), _u(rng, n, 0.04, 0.08), gain=0.3),
            _octaves(rng, n, _u(rng, n, 0.8, 1.6), _u(rng, n, 0.05, 0.10), gain=0.3),
            _octaves(rng, n, _u(rng, n, 0.5, 1.2), _u(rng, n, 0.06, 0.12), gain=0.3),
        ],
        1,
    )
    ridge_y = np.stack([_u(rng, n, 0.56, 0.62), _u(rng, n, 0.70, 0.76), _u(rng, n, 0.86, 0.94)], 1)
    sun = np.stack([_u(rng, n, 0.1, 0.9), _u(rng, n, 0.10, 0.30), _u(rng, n, 0.04, 0.06), np.zeros(n, np.float32)], 1)
    objects = np.zeros((n, N_OBJECTS, 4), np.float32)
    cacti = rng.integers(0, 4, n)
    used = np.arange(N_OBJECTS)[None] < cacti[:, None]
    objects[..., 0] = _u(rng, n, 0.05, 0.95, (N_OBJECTS,))  # x
    objects[..., 1] = _u(rng, n, 0.0, 1.0, (N_OBJECTS,))  # which dune layer it stands on (0..1 -> mid/near)
    objects[..., 2] = _u(rng, n, 0.07, 0.16, (N_OBJECTS,)) * used  # height
    objects[..., 3] = _u(rng, n, 0.0, 1.0, (N_OBJECTS,))  # arm layout
    knobs = np.zeros((n, N_KNOBS), np.float32)
    knobs[:, 0] = (rng.random(n) < 0.5).astype(np.float32)  # distant mesas present
    knobs[:, 1] = _u(rng, n, 0.2, 0.8)  # mesa position
    knobs[:, 2] = _u(rng, n, 0.05, 0.12)  # mesa height
    knobs[:, 3] = _u(rng, n, 0.1, 0.25)  # mesa width
    knobs[:, 4] = _u(rng, n, 0, TAU)  # ripple direction
    scene = dict(
        sky=_sky(rng, n, (0.30, 0.55, 0.88), (0.58, 0.74, 0.92), (0.96, 0.90, 0.74)),
        palette=_palette(rng, n, DESERT_COLORS),
        horizon=ridge_y[:, 0],
        ridges=ridges,
        ridge_y=ridge_y,
        sun=sun,
        objects=objects,
        knobs=knobs,
    )
    return _golden_hour(rng, n, scene, 0.25)


def _sample_sunset(rng, n):
    horizon = _u(rng, n, 0.48, 0.64)
    sun = np.stack(
        [_u(rng, n, 0.2, 0.8), horizon - _u(rng, n, -0.03, 0.14), _u(rng, n, 0.06, 0.11), _u(rng, n, 0.15, 0.35)], 1
    )
    ridges = np.zeros((n, N_LAYERS, N_OCTAVES, 3), np.float32)
    ridges[:, 0] = _octaves(rng, n, _u(rng, n, 2.0, 4.0), _u(rng, n, 0.02, 0.05), gain=0.5)
    knobs = np.zeros((n, N_KNOBS), np.float32)
    knobs[:, 0] = (rng.random(n) < 0.4).astype(np.float32)  # island present
    knobs[:, 1] = _u(rng, n, -0.1, 1.1)  # island centre
    knobs[:, 2] = _u(rng, n, 0.1, 0.3)  # island half-width
    return dict(
        sky=_sky(rng, n, (0.22, 0.16, 0.42), (0.85, 0.38, 0.45), (1.00, 0.68, 0.30), jitter=0.06),
        palette=_palette(rng, n, SUNSET_COLORS),
        horizon=horizon,
        ridges=ridges,
        ridge_y=np.stack([horizon, horizon, horizon], 1),
        sun=sun,
        clouds=_clouds(rng, n, 6, 0.05, 0.45, 0.10, 0.30, 0.08, 0.16),
        knobs=knobs,
    )


def _sample_night(rng, n):
    ridges = np.stack(
        [
            _octaves(rng, n, _u(rng, n, 0.6, 1.4), _u(rng, n, 0.06, 0.12), gain=0.45),
            _octaves(rng, n, _u(rng, n, 0.5, 1.0), _u(rng, n, 0.04, 0.08), gain=0.45),
            np.zeros((n, N_OCTAVES, 3), np.float32),
        ],
        1,
    )
    ridge_y = np.stack([_u(rng, n, 0.72, 0.80), _u(rng, n, 0.84, 0.92), np.ones(n, np.float32)], 1)
    sun = np.stack(
        [_u(rng, n, 0.15, 0.85), _u(rng, n, 0.12, 0.40), _u(rng, n, 0.04, 0.08), _u(rng, n, -1.0, 1.0)], 1
    )
    knobs = np.zeros((n, N_KNOBS), np.float32)
    knobs[:, 0] = _u(rng, n, 0.35, 0.75)  # star density
    knobs[:, 1] = _u(rng, n, 0.0, 1.0) * (rng.random(n) < 0.6)  # milky way strength
    knobs[:, 2] = _u(rng, n, -0.6, 0.6)  # milky way slope
    knobs[:, 3] = _u(rng, n, 0.2, 0.6)  # milky way intercept
    knobs[:, 4] = _u(rng, n, 0.0, 0.8)  # silhouette tree density
    return dict(
        sky=_sky(rng, n, (0.01, 0.02, 0.07), (0.03, 0.05, 0.15), (0.10, 0.14, 0.30), jitter=0.02),
        palette=_palette(rng, n, NIGHT_COLORS, jitter=0.02, tint=0.04),
        horizon=ridge_y[:, 0],
        ridges=ridges,
        ridge_y=ridge_y,
        sun=sun,
        knobs=knobs,
    )


def _sample_forest(rng, n):
    ridges = np.zeros((n, N_LAYERS, N_OCTAVES, 3), np.float32)
    for layer in range(N_LAYERS):
        ridges[:, layer] = _octaves(rng, n, _u(rng, n, 0.5, 1.2), _u(rng, n, 0.02, 0.05), gain=0.4)
    ridge_y = np.stack([_u(rng, n, 0.40, 0.50), _u(rng, n, 0.58, 0.68), _u(rng, n, 0.76, 0.86)], 1)
    knobs = np.zeros((n, N_KNOBS), np.float32)
    knobs[:, 3] = _u(rng, n, 0.12, 0.22)  # far row tree height
    knobs[:, 4] = _u(rng, n, 0.18, 0.30)  # mid row tree height
    knobs[:, 5] = _u(rng, n, 0.26, 0.42)  # near row tree height
    knobs[:, 0:3] = knobs[:, 3:6] * _u(rng, n, 0.18, 0.28, (3,))  # row spacings (slender to stout)
    knobs[:, 6] = _u(rng, n, 0.4, 1.0)  # mist
    knobs[:, 7] = _u(rng, n, 0.6, 1.0)  # tree density
    objects = np.zeros((n, N_OBJECTS, 4), np.float32)
    big = rng.integers(0, 3, n)  # big conifers in front: x, base y, height, crown width / height
    side = np.where(rng.random((n, 2)) < 0.5, _u(rng, n, -0.05, 0.25, (2,)), _u(rng, n, 0.75, 1.05, (2,)))
    objects[:, :2, 0] = side
    objects[:, :2, 1] = _u(rng, n, 0.95, 1.05, (2,))
    objects[:, :2, 2] = _u(rng, n, 0.6, 0.9, (2,)) * (np.arange(2)[None] < big[:, None])
    objects[:, :2, 3] = _u(rng, n, 0.22, 0.32, (2,))
    palette = _palette(rng, n, FOREST_COLORS)
    # autumn: some scenes are larch forests turning gold, row by row
    autumn = _u(rng, n, 0.3, 0.9, (3,)) * (rng.random((n, 1)) < 0.3)
    gold = np.array([[0.62, 0.55, 0.30], [0.70, 0.50, 0.15], [0.55, 0.32, 0.08]], np.float32)
    palette[:, :3] += autumn[..., None] * (gold[None] - palette[:, :3])
    return dict(
        sky=_sky(rng, n, (0.55, 0.70, 0.80), (0.75, 0.84, 0.86), (0.88, 0.91, 0.85)),
        palette=palette,
        horizon=ridge_y[:, 0],
        ridges=ridges,
        ridge_y=ridge_y,
        objects=objects,
        knobs=knobs,
    )


def _sample_snowfield(rng, n):
    ridges = np.stack(
        [
            _octaves(rng, n, _u(rng, n, 1.0, 2.0), _u(rng, n, 0.05, 0.10), gain=0.45),
            _octaves(rng, n, _u(rng, n, 0.5, 1.0), _u(rng, n, 0.03, 0.06), gain=0.3),
            _octaves(rng, n, _u(rng, n, 0.4, 0.9), _u(rng, n, 0.04, 0.08), gain=0.3),
        ],
        1,
    )
    ridge_y = np.stack([_u(rng, n, 0.42, 0.55), _u(rng, n, 0.58, 0.68), _u(rng, n, 0.76, 0.88)], 1)
    sun = np.stack([_u(rng, n, 0.1, 0.9), _u(rng, n, 0.12, 0.35), _u(rng, n, 0.03, 0.05), _u(rng, n, 0.2, 1.0)], 1)
    knobs = np.zeros((n, N_KNOBS), np.float32)
    knobs[:, 0] = _u(rng, n, -0.2, 0.4)  # tree density on the middle hill (<= 0: none)
    knobs[:, 1] = _u(rng, n, 0.03, 0.06)  # tree spacing
    knobs[:, 2] = _u(rng, n, 0.0, 1.0)  # overcast amount
    knobs[:, 3] = _u(rng, n, 0, TAU)  # wind ripple direction
    scene = dict(
        sky=_sky(rng, n, (0.52, 0.66, 0.86), (0.74, 0.82, 0.92), (0.92, 0.93, 0.96)),
        palette=_palette(rng, n, SNOW_COLORS, jitter=0.02, tint=0.03),
        horizon=ridge_y[:, 0],
        ridges=ridges,
        ridge_y=ridge_y,
        sun=sun,
        knobs=knobs,
    )
    return _golden_hour(rng, n, scene, 0.25)


def _sample_volcano(rng, n):
    ridges = np.stack(
        [
            _octaves(rng, n, _u(rng, n, 0.8, 1.6), _u(rng, n, 0.03, 0.06), gain=0.45),
            _octaves(rng, n, _u(rng, n, 3.0, 5.0), _u(rng, n, 0.004, 0.010), gain=0.55),
            _octaves(rng, n, _u(rng, n, 0.5, 1.0), _u(rng, n, 0.02, 0.04), gain=0.4),
        ],
        1,
    )
    ridge_y = np.stack([_u(rng, n, 0.70, 0.78), np.zeros(n, np.float32), _u(rng, n, 0.88, 0.95)], 1)
    knobs = np.zeros((n, N_KNOBS), np.float32)
    cx = _u(rng, n, 0.3, 0.7)
    peak = _u(rng, n, 0.26, 0.42)
    knobs[:, 0] = cx  # cone centre
    knobs[:, 1] = peak  # crater rim y
    knobs[:, 2] = _u(rng, n, 0.35, 0.55)  # cone half-width at the base
    knobs[:, 3] = _u(rng, n, 0.03, 0.07)  # crater half-width
    knobs[:, 4] = _u(rng, n, 1.3, 2.0)  # flank concavity
    knobs[:, 5] = _u(rng, n, 0.3, 1.0)  # glow strength
    objects = np.zeros((n, N_OBJECTS, 4), np.float32)
    # plume puffs in slots 0..9: rising from the crater, drifting with the wind
    puffs = rng.integers(4, 11, n)
    k = np.arange(10, dtype=np.float32)
    drift = _u(rng, n, -0.5, 0.5)
    rise = (k[None] + _u(rng, n, 0, 0.6, (10,))) / 10 * (peak[:, None] + 0.05)
    objects[:, :10, 0] = cx[:, None] + drift[:, None] * rise + _u(rng, n, -0.02, 0.02, (10,))
    objects[:, :10, 1] = peak[:, None] - rise
    objects[:, :10, 2] = (0.035 + 0.35 * rise * _u(rng, n, 0.5, 0.8)[:, None]) * (k[None] < puffs[:, None])
    objects[:, :10, 3] = _u(rng, n, 0, 1, (10,))
    # lava streams in slots 10..13: x offset at the rim, wiggle, phase, width
    streams = rng.integers(0, 5, n)
    used = np.arange(4)[None] < streams[:, None]
    objects[:, 10:14, 0] = _u(rng, n, -1, 1, (4,))
    objects[:, 10:14, 1] = _u(rng, n, 0.005, 0.02, (4,))
    objects[:, 10:14, 2] = _u(rng, n, 0.008, 0.016, (4,)) * used
    objects[:, 10:14, 3] = _u(rng, n, 0, TAU, (4,))
    return dict(
        sky=_sky(rng, n, (0.12, 0.09, 0.12), (0.35, 0.20, 0.20), (0.75, 0.35, 0.18), jitter=0.05),
        palette=_palette(rng, n, VOLCANO_COLORS),
        horizon=ridge_y[:, 0],
        ridges=ridges,
        ridge_y=ridge_y,
        objects=objects,
        knobs=knobs,
    )


def _sample_lake(rng, n):
    water = _u(rng, n, 0.52, 0.64)
    ridges = np.stack(
        [
            _octaves(rng, n, _u(rng, n, 1.0, 2.0), _u(rng, n, 0.07, 0.12), gain=0.45),
            _octaves(rng, n, _u(rng, n, 0.6, 1.2), _u(rng, n, 0.03, 0.06), gain=0.4),
            np.zeros((n, N_OCTAVES, 3), np.float32),
        ],
        1,
    )
    ridge_y = np.stack([water - _u(rng, n, 0.06, 0.10), water, water], 1)
    knobs = np.zeros((n, N_KNOBS), np.float32)
    knobs[:, 0] = _u(rng, n, 0.3, 1.0)  # tree density along the shore
    knobs[:, 1] = _u(rng, n, 0.025, 0.045)  # tree spacing
    knobs[:, 2] = _u(rng, n, 0.002, 0.008)  # ripple amplitude
    knobs[:, 3] = _u(rng, n, 0.3, 0.6)  # water tint strength
    knobs[:, 4] = (rng.random(n) < 0.6).astype(np.float32)  # snow on the far mountains
    scene = dict(
        sky=_sky(rng, n, (0.24, 0.48, 0.82), (0.50, 0.68, 0.90), (0.82, 0.88, 0.94)),
        palette=_palette(rng, n, LAKE_COLORS),
        horizon=water,
        ridges=ridges,
        ridge_y=ridge_y,
        clouds=_clouds(rng, n, 4, 0.05, 0.30, 0.05, 0.14, 0.25, 0.45),
        knobs=knobs,
    )
    return _golden_hour(rng, n, scene, 0.3)


_SAMPLERS = (
    _sample_alpine,
    _sample_desert,
    _sample_sunset,
    _sample_night,
    _sample_forest,
    _sample_snowfield,
    _sample_volcano,
    _sample_lake,
)


def _empty_params(n: int) -> SceneParams:
    z = lambda *shape: np.zeros((n, *shape), np.float32)  # noqa: E731
    return SceneParams(
        labels=np.zeros(n, np.int64),
        seed=np.zeros(n, np.uint32),
        sky=z(3, 3),
        palette=z(N_COLORS, 3),
        horizon=z(),
        ridges=z(N_LAYERS, N_OCTAVES, 3),
        ridge_y=z(N_LAYERS),
        sun=z(4),
        objects=z(N_OBJECTS, 4),
        clouds=z(N_CLOUDS, 4),
        knobs=z(N_KNOBS),
    )


def sample_params(rng: np.random.Generator, labels: np.ndarray) -> SceneParams:
    """Draw random scenes of the given classes (all randomness of a scene lives in its params)."""
    labels = np.asarray(labels, np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be in [0, {NUM_CLASSES}), got {labels.min()}..{labels.max()}")
    p = _empty_params(len(labels))
    p.labels[:] = labels
    p.seed[:] = rng.integers(0, 2**32, len(labels), dtype=np.uint32)
    for c, sampler in enumerate(_SAMPLERS):
        idx = np.flatnonzero(labels == c)
        if len(idx):
            for name, value in sampler(rng, len(idx)).items():
                getattr(p, name)[idx] = value
    return p


# ----------------------------------------------------------------------------
# Rendering primitives. Coordinates: X [n,1,W] or [n,H,W], Y [n,H,1] or [n,H,W].


@dataclass
class _Canvas:
    X: np.ndarray  # x of pixel centres, in [0, 1] scene units
    Y: np.ndarray  # y of pixel centres (downwards)
    pw: float  # pixel width in scene units
    shape: tuple  # (n, H, W)

    def col(self, a):
        """Per-scene scalar [n] (or one scalar) -> [n,1,1] for broadcasting over pixels."""
        return np.broadcast_to(np.asarray(a, np.float32), self.shape[:1])[:, None, None]


def _fade(freq, pw):
    """Band limit: weight of a detail with `freq` cycles/unit, 1 above 4 px per cycle, 0 below 2 px."""
    return np.clip((1.0 / (freq * pw) - 2.0) / 2.0, 0.0, 1.0).astype(np.float32)


def _cover(d, pw):
    """Anti-aliased coverage of a signed distance (positive inside) for pixel width pw."""
    return np.clip(d * np.float32(1.0 / pw) + np.float32(0.5), 0.0, 1.0)


def _smooth(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _paint(img, alpha, color):
    """Composite `color` ([n,3] or [n,H,W,3]) over img with coverage alpha, in place."""
    if color.ndim == 2:
        color = color[:, None, None, :]
    img += alpha[..., None] * (color - img)


def _mix(a, b, t):
    """Per-pixel blend of colours a, b ([n,3] or [...,3]) by t [n,H,W]."""
    if a.ndim == 2:
        a = a[:, None, None, :]
    if b.ndim == 2:
        b = b[:, None, None, :]
    return a + t[..., None] * (b - a)


_M1, _M2, _M3 = np.uint32(0x8DA6B343), np.uint32(0xD8163841), np.uint32(0xCB1AB31F)
_M4, _M5 = np.uint32(0x2C1B3C6D), np.uint32(0x297A2D39)


def _as_u32(i):
    return np.asarray(i, np.int32).view(np.uint32)


def _hash01(h):
    """Avalanche a uint32 array and map it to float32 in [0, 1)."""
    h = h ^ (h >> np.uint32(15))
    h = h * _M4
    h = h ^ (h >> np.uint32(12))
    h = h * _M5
    h = h ^ (h >> np.uint32(15))
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _lattice1(i, seed, salt):
    """Hashed random value in [0,1) per integer cell i (1D) and scene seed [n,1,1]."""
    return _hash01(_as_u32(i) * _M1 ^ (seed * _M3 + np.uint32(salt)))


def _value_noise(x, y, seed, salt):
    """Smooth 2D value noise in [-1, 1] at continuous coords (lattice spacing 1)."""
    fx, fy = np.floor(x), np.floor(y)
    ux, uy = x - fx, y - fy
    ux = ux * ux * (3 - 2 * ux)
    uy = uy * uy * (3 - 2 * uy)
    s = seed * _M3 + np.uint32(salt * 7919)
    ix, iy = _as_u32(fx), _as_u32(fy)
    hx0, hx1 = ix * _M1 ^ s, (ix + np.uint32(1)) * _M1 ^ s
    hy0, hy1 = iy * _M2, (iy + np.uint32(1)) * _M2
    a, b = _hash01(hx0 ^ hy0), _hash01(hx1 ^ hy0)
    c, d = _hash01(hx0 ^ hy1), _hash01(hx1 ^ hy1)
    top = a + ux * (b - a)
    bot = c + ux * (d - c)
    return (top + uy * (bot - top)) * 2 - 1


def _fbm(cv: _Canvas, seed, f0, octaves, salt, stretch=(1.0, 1.0), gain=0.5):
    """Fractal value noise, about [-1, 1]; octaves finer than the pixel grid fade to their mean (0)."""
    seed = seed[:, None, None]
    total = np.zeros((), np.float32)
    norm = sum(gain**k for k in range(octaves))
    for k in range(octaves):
        f = f0 * 2**k
        w = float(_fade(f * max(stretch), cv.pw))
        if w <= 0:
            break
        off = 17.31 * (k + 1) + salt * 3.7
        fx, fy = np.float32(f * stretch[0]), np.float32(f * stretch[1])
        n = _value_noise(cv.X * fx + off, cv.Y * fy - off, seed, salt + k)
        total = total + np.float32(gain**k * w / norm) * n
    return total


def _ridge(cv: _Canvas, octaves, sharp: bool, X=None):
    """Height profile h(x) >= 0 and dh/dx from sine octaves [n,K,3]; sharp = cusped peaks."""
    X = cv.X if X is None else X
    h = np.zeros((), np.float32)
    dh = np.zeros((), np.float32)
    for k in range(octaves.shape[1]):
        a, f, ph = (octaves[:, k, i][:, None, None] for i in range(3))
        a = a * _fade(f, cv.pw)
        t = TAU * f * X + ph
        if sharp:
            # 1 - 2|sin(t/2)|: cusped peaks, rounded valleys
            s, c = np.sin(t / 2), np.cos(t / 2)
            h = h + a * (1 - 2 * np.abs(s))
            dh = dh - a * np.sign(s) * c * TAU * f
        else:
            h = h + a * np.sin(t)
            dh = dh + a * np.cos(t) * TAU * f
    total = octaves[:, :, 0].sum(1)[:, None, None]
    return h + total, dh  # shifted by the total amplitude so that h >= 0


def _below(cv: _Canvas, y_top, slope, Y=None):
    """Coverage of the region below the curve y_top(x) with the given slope (anti-aliased)."""
    Y = cv.Y if Y is None else Y
    return _cover((Y - y_top) / np.sqrt(1 + slope * slope), cv.pw)


def _treeline(cv: _Canvas, seed, salt, spacing, height, density, X=None):
    """Conifer silhouettes on hashed cells along x: tree height above the base at each x, and slope."""
    X = cv.X if X is None else X
    spacing = cv.col(spacing)
    g = X / spacing
    cell = np.floor(g)
    best = np.zeros_like(X)
    best_slope = np.zeros_like(X)
    for k in (-1.0, 0.0, 1.0):
        c = cell + np.float32(k)
        present = _lattice1(c, seed[:, None, None], salt) < cv.col(density)
        centre = c + 0.5 + 0.5 * (_lattice1(c, seed[:, None, None], salt + 1) - 0.5)
        tree_h = cv.col(height) * (0.55 + 0.45 * _lattice1(c, seed[:, None, None], salt + 2)) * present
        half_w = 0.9 + 0.5 * _lattice1(c, seed[:, None, None], salt + 3)  # in cells
        u = np.abs(g - centre) / half_w  # 0 at the trunk, 1 at the widest branch
        serr = 0.1 * np.abs(((u * 4) % 1.0) - 0.5)  # tiered branches
        h = tree_h * np.clip(1 - u - serr, 0, None)
        slope = tree_h / (half_w * spacing) * (u < 1)
        take = h > best
        best = np.where(take, h, best)
        best_slope = np.where(take, slope, best_slope)
    return best, best_slope


def _box(cv, cx, cy, hw, hh):
    """Approximate signed distance (positive inside) to axis-aligned boxes, per scene."""
    return np.minimum(hw - np.abs(cv.X - cx), hh - np.abs(cv.Y - cy))


def _conifer(cv: _Canvas, x, base, height, width, tiers=5):
    """Coverage of a tiered conifer crown and of its trunk (per scene: foot x, base y, height, crown half-width)."""
    x, base, height, width = (cv.col(v) for v in (x, base, height, width))
    top = base - height
    t = np.clip((cv.Y - top) / np.maximum(height, 1e-6), 0, 1)  # 0 at the tip, 1 at the foot
    half = width * (0.08 + 0.92 * t) * (0.7 + 0.3 * ((t * tiers) % 1.0))
    crown = np.minimum(half - np.abs(cv.X - x), np.minimum(cv.Y - top, base - 0.1 * height - cv.Y))
    stem = _box(cv, x, base - 0.1 * height, 0.06 * width, 0.1 * height + cv.pw)
    alive = height > 0
    return _cover(crown, cv.pw) * alive, _cover(stem, cv.pw) * alive


def _face_light(cv: _Canvas, slope, top, reach, Y=None):
    """Light in [-1, 1] of a face with slope dy/dx (lit when it faces right), fading out `reach` below the crest."""
    Y = cv.Y if Y is None else Y
    return np.tanh(slope * 1.5) * np.exp(-np.clip(Y - top, 0, None) / reach)


def _sky_gradient(p: SceneParams, cv: _Canvas):
    """Quadratic gradient top -> middle -> horizon colour, as a fresh [n,H,W,3] image."""
    t = np.clip(cv.Y / cv.col(p.horizon), 0, 1)[..., None]
    top, mid, hor = (p.sky[:, i][:, None, None, :] for i in range(3))
    sky = (1 - t) ** 2 * top + 2 * t * (1 - t) * mid + t * t * hor
    return np.ascontiguousarray(np.broadcast_to(sky, (*cv.shape, 3)), np.float32).copy()


def _disc(cv: _Canvas, x, y, r, X=None, Y=None):
    """Coverage of discs of centre (x, y) and radius r (per scene), and the distance field."""
    X = cv.X if X is None else X
    Y = cv.Y if Y is None else Y
    d = np.sqrt((X - cv.col(x)) ** 2 + (Y - cv.col(y)) ** 2)
    return _cover(cv.col(r) - d, cv.pw), d


_CUMULUS = ((0.0, 0.0, 1.0), (-0.75, 0.1, 0.55), (0.7, 0.05, 0.6), (0.2, -0.7, 0.55))  # puffs: dx, dy, scale


def _cloud_density(cv: _Canvas, blobs, X=None, Y=None, puffs=_CUMULUS):
    """Density of clouds [n,K,4] (x, y, half-width, half-height), each a few separable Gaussian puffs; None if none."""
    X = cv.X if X is None else X
    Y = cv.Y if Y is None else Y
    dens = None
    for k in range(blobs.shape[1]):
        x0, y0, w0, h0 = (blobs[:, k, i][:, None, None] for i in range(4))
        if not np.any(w0 > 0):
            continue
        used = w0 > 0
        w0, h0 = np.maximum(w0, 1e-6), np.maximum(h0, 1e-6)
        for dx, dy, scale in puffs:
            x, y, w, hh = x0 + dx * w0, y0 + dy * h0, w0 * scale, h0 * scale * 1.4
            gx = np.exp(-(((X - x) / w) ** 2)) * used
            v = (Y - y) / hh
            gy = np.exp(-np.where(v > 0, 2.5 * v, v) ** 2)  # flatter bottoms
            dens = gx * gy if dens is None else dens + gx * gy
    return dens


def _star_layer(cv: _Canvas, seed, salt, cell, density, r_lo, r_hi):
    """Hashed star field: one star (or none) per cell, flux-preserving at any resolution."""
    gx, gy = cv.X / cell, cv.Y / cell
    fx, fy = np.floor(gx), np.floor(gy)
    s = seed[:, None, None] * _M3 + np.uint32(salt * 7919)
    h = _as_u32(fx) * _M1 ^ s ^ _as_u32(fy) * _M2
    present = _hash01(h) < cv.col(density)
    sx = 0.3 + 0.4 * _hash01(h + np.uint32(1))
    sy = 0.3 + 0.4 * _hash01(h + np.uint32(2))
    b = _hash01(h + np.uint32(3))
    r = r_lo + (r_hi - r_lo) * b * b
    d = np.sqrt((gx - fx - sx) ** 2 + (gy - fy - sy) ** 2) * cell
    r_draw = np.maximum(r, 0.5 * cv.pw)  # never thinner than a pixel: dimmer instead
    flux = (r / r_draw) ** 2
    return present * flux * (0.5 + 0.5 * b) * _cover(r_draw - d, cv.pw)


# ----------------------------------------------------------------------------
# Painters, one per class: (params of that class, canvas) -> image [n,H,W,3].


def _layer_top(p, cv, layer, sharp, X=None):
    """Top edge y(x) of ridge layer `layer`, its slope dy/dx, and the slope of its two broadest octaves (shading)."""
    h, dh = _ridge(cv, p.ridges[:, layer], sharp, X)
    _, dh_broad = _ridge(cv, p.ridges[:, layer, :2], sharp, X)
    return cv.col(p.ridge_y[:, layer]) - h, -dh, -dh_broad


def _paint_clouds(img, p, cv, light, shade, X=None, Y=None, opacity=1.0):
    dens = _cloud_density(cv, p.clouds, X, Y)
    if dens is None:
        return
    tex = _fbm(cv if X is None else _Canvas(X, Y, cv.pw, cv.shape), p.seed, 8.0, 5, 51)
    dens = dens * (1 + 0.6 * tex)
    alpha = _smooth(0.3, 0.7, dens) * opacity
    _paint(img, alpha, _mix(light, shade, np.clip(dens - 0.6, 0, 1) * 0.6))


def _rock_face(p, cv, layer, rock, snow, snowline, top, broad, tex, gully, Y=None):
    """Colour of a rocky range: lit / shaded faces, gullies, snow above `snowline` (fraction of the peak height)."""
    Y = cv.Y if Y is None else Y
    peak = p.ridges[:, layer, :, 0].sum(1) * 2
    altitude = cv.col(p.ridge_y[:, layer]) - Y
    face = _face_light(cv, broad, top, 0.12, Y)[..., None] * 0.2
    col = rock[:, None, None, :] * (1 + face + 0.1 * tex[..., None] + 0.15 * gully[..., None])
    snow_alt = cv.col(snowline * peak) + 0.04 * tex - 0.03 * np.tanh(broad) - 0.06 * gully
    on_snow = _cover(altitude - snow_alt, cv.pw)
    return _mix(col, snow[:, None, None, :] * (1 + face * 0.5), on_snow)


def _paint_alpine(p: SceneParams, cv: _Canvas) -> np.ndarray:
    rock_far, rock_near, snow, meadow, tree, cloud = (p.palette[:, i] for i in range(6))
    snowline, tree_density, tree_spacing = p.knobs[:, 0], p.knobs[:, 1], p.knobs[:, 2]
    img = _sky_gradient(p, cv)
    tex = _fbm(cv, p.seed, 6.0, 6, 1)
    # clouds drifting over the sky
    _paint_clouds(img, p, cv, cloud, cloud * 0.8)
    # two ranges of sharp peaks: rock shaded by face orientation, snow above the snowline
    gully = _fbm(cv, p.seed, 4.0, 6, 2, stretch=(4.0, 0.5))
    for layer, rock in ((0, rock_far), (1, rock_near)):
        top, slope, broad = _layer_top(p, cv, layer, sharp=True)
        col = _rock_face(p, cv, layer, rock, snow, snowline, top, broad, tex, gully)
        _paint(img, _below(cv, top, slope), col)
    # green meadow in front with a sparse line of conifers on its crest
    top, slope, _ = _layer_top(p, cv, 2, sharp=False)
    trees, tslope = _treeline(cv, p.seed, 10, tree_spacing, 0.09, tree_density)
    _paint(img, _below(cv, top + 0.005 - trees, tslope + slope), tree)
    depth = np.clip((cv.Y - top) * 5, 0, 1)[..., None]
    grass = meadow[:, None, None, :] * (1 + 0.15 * tex[..., None] - 0.25 * depth)
    _paint(img, _below(cv, top, slope), grass)
    return img


def _paint_desert(p: SceneParams, cv: _Canvas) -> np.ndarray:
    mesa, dune_far, dune_mid, dune_near, sun, cactus = (p.palette[:, i] for i in range(6))
    has_mesa, mesa_x, mesa_h, mesa_w, ripple_dir = (p.knobs[:, i] for i in range(5))
    img = _sky_gradient(p, cv)
    # sun with a wide glare
    disc, d = _disc(cv, p.sun[:, 0], p.sun[:, 1], p.sun[:, 2])
    _paint(img, 0.5 * np.exp(-d / 0.12), sun)
    _paint(img, disc, sun)
    # flat-topped mesa on the horizon
    u = np.abs(cv.X - cv.col(mesa_x)) - cv.col(mesa_w)
    mesa_top = cv.col(p.ridge_y[:, 0] - mesa_h * has_mesa) + np.clip(u, 0, None) * 2.5
    _paint(img, _below(cv, mesa_top, 2.5 * (u > 0)), mesa)
    # three dune ranges with sharp crests: lit face / shadow face, ripples on the near ones
    ripples = np.sin(
        TAU * 70 * (cv.X * cv.col(np.cos(ripple_dir)) * 0.3 + cv.Y) + 3 * _fbm(cv, p.seed, 4.0, 2, 3)
    ) * _fade(70.0, cv.pw)
    for layer, col in ((0, dune_far), (1, dune_mid), (2, dune_near)):
        top, slope, broad = _layer_top(p, cv, layer, sharp=True)
        lit = _face_light(cv, broad * 20 * cv.col(np.sign(p.sun[:, 0] - 0.5)), top, 0.08)
        shade = col[:, None, None, :] * (0.88 + 0.12 * lit[..., None])
        shade = shade * (1 + 0.04 * layer * ripples[..., None])
        _paint(img, _below(cv, top, slope), shade)
        # cacti standing on the mid and near dunes
        if layer >= 1:
            _paint_cacti(img, p, cv, layer, cactus)
    return img


def _paint_cacti(img, p, cv, layer, color):
    """Saguaro silhouettes (trunk + two arms) standing on ridge layer `layer`."""
    for k in range(4):
        x, which, h, arms = (p.objects[:, k, i] for i in range(4))
        h = h * ((which < 0.5) == (layer == 1)) * (0.6 if layer == 1 else 1.0)
        if not np.any(h > 0):
            continue
        ground, _ = _ridge(cv, p.ridges[:, layer], sharp=True, X=x[:, None, None])
        base = cv.col(p.ridge_y[:, layer]) - ground + 0.01
        x, h, arms = cv.col(x), cv.col(h), cv.col(arms)
        w = h * 0.09
        d = _box(cv, x, base - h / 2, w, h / 2)
        for side, at in ((-1, 0.40 + 0.2 * arms), (1, 0.30 + 0.25 * (1 - arms))):
            ay = base - h * at
            d = np.maximum(d, _box(cv, x + side * 1.5 * w, ay, 1.5 * w, 0.8 * w))
            d = np.maximum(d, _box(cv, x + side * 3 * w, ay - 0.12 * h, 0.8 * w, 0.12 * h + 0.8 * w))
        _paint(img, _cover(d, cv.pw) * (h > 0), color)


def _paint_sunset(p: SceneParams, cv: _Canvas) -> np.ndarray:
    sun, sea_far, sea_near, cloud_lit, cloud_dark, island = (p.palette[:, i] for i in range(6))
    has_island, island_x, island_w = p.knobs[:, 0], p.knobs[:, 1], p.knobs[:, 2]
    hor = cv.col(p.horizon)
    img = _sky_gradient(p, cv)
    # sun glow and disc (the sea hides its lower part)
    disc, d = _disc(cv, p.sun[:, 0], p.sun[:, 1], p.sun[:, 2])
    _paint(img, cv.col(p.sun[:, 3] + 0.3) * np.exp(-d / 0.15), sun)
    _paint(img, disc, sun)
    # long thin clouds, lit from below
    dens = _cloud_density(cv, p.clouds, puffs=((0.0, 0.0, 1.0), (0.5, 0.6, 0.6)))
    if dens is not None:
        dens = dens * (1 + 0.4 * _fbm(cv, p.seed, 8.0, 4, 61, stretch=(0.4, 2.0)))
        below_sun = np.clip((cv.Y - cv.col(p.sun[:, 1] - 0.3)) * 3, 0, 1)
        _paint(img, _smooth(0.3, 0.7, dens) * 0.9, _mix(cloud_dark, cloud_lit, below_sun))
    # a dark island silhouette on the horizon
    u = (cv.X - cv.col(island_x)) / cv.col(island_w)
    isle_h = cv.col(0.05 * has_island) * np.clip(1 - u * u, 0, None) ** 0.7
    h, dh = _ridge(cv, p.ridges[:, 0], sharp=False)
    top = hor - isle_h * (1 + 0.3 * h)
    _paint(img, _below(cv, top, -dh * isle_h), island)
    # sea: gradient from the sky's horizon colour to deep water, waves, glitter path under the sun
    depth = np.clip((cv.Y - hor) / (1 - hor), 0, 1)
    sea = _mix(sea_far * 0.5 + p.sky[:, 2] * 0.5, sea_near, np.sqrt(depth))
    waves = _fbm(cv, p.seed, 6.0, 6, 62, stretch=(0.25, 4.0))
    sea = sea * (1 + 0.15 * waves[..., None])
    width = 0.02 + 0.25 * depth + cv.col(p.sun[:, 2]) * 0.6
    path = np.exp(-(((cv.X - cv.col(p.sun[:, 0])) / width) ** 2)) * (0.25 + 0.75 * depth) ** 0.3
    glitter = (0.3 + 0.7 * _smooth(0.0, 0.5, waves)) * path * (0.4 + 0.6 * (1 - depth))
    sea = _mix(sea, sun, np.clip(glitter, 0, 1))
    _paint(img, _cover(cv.Y - hor, cv.pw), sea)
    return img


def _paint_night(p: SceneParams, cv: _Canvas) -> np.ndarray:
    moon, hills_far, hills_near, star, milky = (p.palette[:, i] for i in range(5))
    density, mw_strength, mw_slope, mw_icpt, tree_density = (p.knobs[:, i] for i in range(5))
    img = _sky_gradient(p, cv)
    # milky way: a faint textured band across the sky
    band_d = (cv.Y - cv.col(mw_icpt) - cv.col(mw_slope) * (cv.X - 0.5)) / np.sqrt(1 + cv.col(mw_slope) ** 2)
    neb = _fbm(cv, p.seed, 5.0, 6, 70)
    band = cv.col(mw_strength) * np.exp(-((band_d / 0.09) ** 2)) * np.clip(0.5 + neb, 0, 1)
    _paint(img, 0.35 * band, milky)
    # stars: sparse bright ones and dense faint ones (hashed cells)
    stars = _star_layer(cv, p.seed, 71, 1 / 7, density, 0.006, 0.02)
    stars = stars + 0.6 * _star_layer(cv, p.seed, 72, 1 / 11, density, 0.004, 0.012)
    stars = stars + 0.8 * band * _star_layer(cv, p.seed, 73, 1 / 17, density + 0.3, 0.002, 0.006)
    _paint(img, np.clip(stars, 0, 1), star)
    # moon: glow, disc with a few darker maria, a shadow disc makes the phase
    disc, d = _disc(cv, p.sun[:, 0], p.sun[:, 1], p.sun[:, 2])
    _paint(img, 0.25 * np.exp(-d / 0.06), moon * 0.6)
    shadow, _ = _disc(cv, p.sun[:, 0] + p.sun[:, 3] * p.sun[:, 2] * 1.2, p.sun[:, 1] - 0.3 * p.sun[:, 2], p.sun[:, 2])
    shadow = shadow * cv.col(np.abs(p.sun[:, 3]) > 0.35)
    maria = _fbm(cv, p.seed, 24.0, 3, 74)
    lit_moon = moon[:, None, None, :] * (0.92 + 0.1 * maria[..., None])
    _paint(img, disc * (1 - shadow), lit_moon)
    # two silhouette hill ranges, trees on the near one
    top, slope, _ = _layer_top(p, cv, 0, sharp=False)
    _paint(img, _below(cv, top, slope), hills_far)
    top, slope, _ = _layer_top(p, cv, 1, sharp=False)
    trees, tslope = _treeline(cv, p.seed, 75, 0.035, 0.08, tree_density)
    _paint(img, _below(cv, top + 0.004 - trees, slope + tslope), hills_near)
    _paint(img, _below(cv, top, slope), hills_near)
    return img


def _paint_forest(p: SceneParams, cv: _Canvas) -> np.ndarray:
    row_far, row_mid, row_near, ground, trunk, front = (p.palette[:, i] for i in range(6))
    spacing, heights, mist, density = p.knobs[:, 0:3], p.knobs[:, 3:6], p.knobs[:, 6], p.knobs[:, 7]
    img = _sky_gradient(p, cv)
    tex = _fbm(cv, p.seed, 8.0, 6, 80)
    haze = p.sky[:, 2]
    # three rows of conifers, hazier with distance, each over its own rolling ground
    rows = ((0, row_far, 0.6), (1, row_mid, 0.3), (2, row_near, 0.0))
    for layer, col, fog in rows:
        top, slope, _ = _layer_top(p, cv, layer, sharp=False)
        trees, tslope = _treeline(cv, p.seed, 81 + 5 * layer, spacing[:, layer], heights[:, layer], density)
        col = col + (haze - col) * (mist * fog)[:, None]
        shade = col[:, None, None, :] * (1 + 0.25 * tex[..., None] * (1 - fog))
        _paint(img, _below(cv, top - trees, tslope + slope), shade)
        # forest floor in front of the nearest row
        if layer == 2:
            floor = ground[:, None, None, :] * (1 + 0.2 * tex[..., None])
            _paint(img, _below(cv, top + 0.02, slope), floor)
    # up to two big conifers right in front, at the sides
    for k in range(2):
        x, base, h, aspect = (p.objects[:, k, i] for i in range(4))
        if not np.any(h > 0):
            continue
        crown, stem = _conifer(cv, x, base, h, h * aspect)
        _paint(img, stem, trunk)
        _paint(img, crown, front[:, None, None, :] * (1 + 0.3 * tex[..., None]))
    return img


def _paint_snowfield(p: SceneParams, cv: _Canvas) -> np.ndarray:
    far, snow_lit, snow_shade, tree, sun = (p.palette[:, i] for i in range(5))
    tree_density, tree_spacing, overcast, wind = (p.knobs[:, i] for i in range(4))
    img = _sky_gradient(p, cv)
    # pale winter sun with a halo, dimmed by the overcast
    disc, d = _disc(cv, p.sun[:, 0], p.sun[:, 1], p.sun[:, 2])
    strength = cv.col(1 - 0.7 * overcast)
    _paint(img, strength * 0.5 * np.exp(-d / 0.1), sun)
    _paint(img, strength * disc, sun)
    # overcast: a flat grey veil over the sky
    _paint(img, cv.col(overcast * 0.5) * np.ones_like(cv.Y), np.full_like(sun, 0.86))
    tex = _fbm(cv, p.seed, 6.0, 6, 90)
    # far pale mountains, then two rolling snow hills shaded by slope, sparkling up close
    top, slope, _ = _layer_top(p, cv, 0, sharp=True)
    _paint(img, _below(cv, top, slope), far[:, None, None, :] * (1 + 0.05 * tex[..., None]))
    sparkle = _star_layer(cv, p.seed, 91, 1 / 24, np.full(cv.shape[0], 0.5), 0.001, 0.003)
    ripples = np.sin(TAU * 40 * (cv.Y + 0.2 * cv.X * cv.col(np.cos(wind))) + 2 * tex) * _fade(40.0, cv.pw)
    for layer in (1, 2):
        top, slope, broad = _layer_top(p, cv, layer, sharp=False)
        if layer == 1:  # a sparse line of dark conifers on the middle hill
            trees, tslope = _treeline(cv, p.seed, 92, tree_spacing, 0.08, tree_density)
            _paint(img, _below(cv, top + 0.01 - trees, slope + tslope), tree)
        lit = 0.6 + 0.4 * _face_light(cv, broad * 3, top, 0.06)
        col = _mix(snow_shade, snow_lit, lit * (1 - 0.3 * np.clip((cv.Y - top) * 6, 0, 1)))
        col = col * (1 + 0.02 * ripples[..., None] + 0.03 * tex[..., None]) + 0.6 * sparkle[..., None]
        _paint(img, _below(cv, top, slope), np.clip(col, 0, 1))
    return img


def _paint_volcano(p: SceneParams, cv: _Canvas) -> np.ndarray:
    cone_c, hills, lava, lava_core, smoke, smoke_lit = (p.palette[:, i] for i in range(6))
    cx, rim, base_w, crater_w, concave, glow = (cv.col(p.knobs[:, i]) for i in range(6))
    img = _sky_gradient(p, cv)
    tex = _fbm(cv, p.seed, 6.0, 6, 100)
    # glow of the eruption on the sky
    dg = np.sqrt((cv.X - cx) ** 2 + 2 * (cv.Y - rim) ** 2)
    _paint(img, glow * 0.6 * np.exp(-dg / 0.12), lava)
    # distant dark hills
    top, slope, _ = _layer_top(p, cv, 0, sharp=False)
    _paint(img, _below(cv, top, slope), hills * 1.3)
    # the cone: concave flanks from the crater rim down to the base, rough edges
    ground_y = cv.col(p.ridge_y[:, 0]) + 0.08
    u = np.clip((np.abs(cv.X - cx) - crater_w) / (base_w - crater_w), 0, 1)  # 0 at the rim, 1 at the foot
    cone_top = rim + (ground_y - rim) * (1 - (1 - u) ** concave)
    cone_slope = (ground_y - rim) * concave * (1 - u) ** (concave - 1) / (base_w - crater_w) * (u > 0) * (u < 1)
    cone_slope = cone_slope * np.sign(cv.X - cx)
    rough, drough = _ridge(cv, p.ridges[:, 1], sharp=True)
    lit = _face_light(cv, cone_slope, cone_top, 0.5)[..., None]
    rock = cone_c[:, None, None, :] * (1 + 0.3 * tex[..., None] + 0.25 * lit)
    # lava streams winding down the flanks from the crater
    lava_a = np.zeros(cv.shape, np.float32)
    for k in range(10, 14):
        off, wig, width, ph = (cv.col(p.objects[:, k, i]) for i in range(4))
        depth = np.clip(cv.Y - rim, 0, None)
        xc = cx + off * crater_w * 0.8 + off * depth * 0.6 + wig * np.sin(cv.Y * 40 + ph) + depth * 0.02 * tex
        lava_a = np.maximum(lava_a, _cover(width * (1 + depth * 2) - np.abs(cv.X - xc), cv.pw) * (width > 0))
    lava_a = lava_a * _cover(cv.Y - rim - 0.005, cv.pw)
    core = _smooth(0.2, 0.9, tex + 0.5)[..., None]
    rock = _mix(rock, lava[:, None, None, :] * (1 - core) + lava_core[:, None, None, :] * core, lava_a)
    # crater glow along the rim
    rim_glow = np.exp(-np.abs(cv.Y - rim) / 0.02) * _cover(crater_w * 1.5 - np.abs(cv.X - cx), cv.pw)
    rock = _mix(rock, lava_core, np.clip(rim_glow * glow, 0, 1) * 0.7)
    _paint(img, _below(cv, cone_top + rough, cone_slope + drough), rock)
    # plume: puffs of ash lit orange from below near the crater
    puffs = p.objects[:, :10].copy()
    puffs[..., 3] = puffs[..., 2] * 0.7
    dens = _cloud_density(cv, puffs, puffs=((0.0, 0.0, 1.0),))
    if dens is not None:
        dens = dens * (1 + 0.45 * tex)
        lit = np.exp(-np.clip(rim - cv.Y, 0, None) / 0.12) * glow
        _paint(img, _smooth(0.3, 0.8, dens) * 0.95, _mix(smoke, smoke_lit, np.clip(lit, 0, 1)))
    # dark foreground ridge with glowing cracks
    top, slope, _ = _layer_top(p, cv, 2, sharp=False)
    cracks = _smooth(0.55, 0.7, _fbm(cv, p.seed, 10.0, 5, 102) + 0.5) * 0.5
    fg = _mix(hills * 0.7, lava, cracks)
    _paint(img, _below(cv, top, slope), fg)
    return img


def _paint_lake_upper(p, cv, X, Y, tex, gully):
    """Everything above the water line, at coordinates (X, Y) (also used for the reflection)."""
    mountain, snow, hills, tree = (p.palette[:, i] for i in range(4))
    cloud = p.palette[:, 6]
    tree_density, tree_spacing, has_snow = p.knobs[:, 0], p.knobs[:, 1], p.knobs[:, 4]
    sub = _Canvas(X, Y, cv.pw, cv.shape)
    img = _sky_gradient(p, sub)
    _paint_clouds(img, p, cv, cloud, cloud * 0.8, X, Y)
    # far mountains, snow on some
    top, slope, broad = _layer_top(p, sub, 0, sharp=True, X=X)
    snowline = np.where(has_snow > 0, 0.6, 10.0)
    col = _rock_face(p, sub, 0, mountain, snow, snowline, top, broad, tex, gully, Y)
    _paint(img, _below(sub, top, slope, Y), col)
    # wooded hills down to the shore
    top, slope, _ = _layer_top(p, sub, 1, sharp=False, X=X)
    trees, tslope = _treeline(sub, p.seed, 110, tree_spacing, 0.07, tree_density, X=X)
    _paint(img, _below(sub, top - trees, slope + tslope, Y), tree)
    _paint(img, _below(sub, top, slope, Y), hills[:, None, None, :] * (1 + 0.2 * tex[..., None]))
    return img


def _paint_lake(p: SceneParams, cv: _Canvas) -> np.ndarray:
    water, shore = p.palette[:, 4], p.palette[:, 5]
    ripple_amp, tint = cv.col(p.knobs[:, 2]), p.knobs[:, 3]
    wl = cv.col(p.horizon)
    X = np.broadcast_to(cv.X, cv.shape)
    Y = np.broadcast_to(cv.Y, cv.shape)
    tex = _fbm(cv, p.seed, 6.0, 6, 111)
    gully = _fbm(cv, p.seed, 4.0, 6, 113, stretch=(4.0, 0.5))
    img = _paint_lake_upper(p, cv, X, Y, tex, gully)
    # reflection: the upper scene mirrored at the water line, rippled, darkened and tinted
    depth = np.clip(Y - wl, 0, None)
    waves = _fbm(cv, p.seed, 5.0, 6, 112, stretch=(0.3, 3.0))
    Xr = X + ripple_amp * (1 + 8 * depth) * waves
    Yr = 2 * wl - Y
    refl = _paint_lake_upper(p, cv, Xr, Yr, tex, gully)
    refl = _mix(refl * 0.85, water, np.clip(cv.col(tint) + 0.4 * depth, 0, 1))
    refl = refl * (1 + 0.08 * waves[..., None])
    _paint(img, _cover(Y - wl, cv.pw), refl)
    # thin bright shore line
    _paint(img, _cover(0.004 - np.abs(Y - wl - 0.002), cv.pw) * 0.8, shore)
    return img


_PAINTERS = (
    _paint_alpine,
    _paint_desert,
    _paint_sunset,
    _paint_night,
    _paint_forest,
    _paint_snowfield,
    _paint_volcano,
    _paint_lake,
)


def render_region(params: SceneParams, size: int, top=0, left=0, height=None, width=None) -> np.ndarray:
    """Render the pixel window [top:top+height, left:left+width] of a size x size image, float32 in [0,1].

    `top` and `left` may be per-scene arrays [N] (random crops); the result equals
    the same window cut out of `render(params, size)`.
    """
    n = len(params)
    height = size if height is None else height
    width = size if width is None else width
    top = np.broadcast_to(np.asarray(top, np.float32), (n,))
    left = np.broadcast_to(np.asarray(left, np.float32), (n,))
    out = np.zeros((n, height, width, 3), np.float32)
    pw = 1.0 / size
    for c, painter in enumerate(_PAINTERS):
        idx = np.flatnonzero(params.labels == c)
        if not len(idx):
            continue
        X = ((left[idx, None, None] + np.arange(width, dtype=np.float32)[None, None, :] + 0.5) * pw).astype(np.float32)
        Y = ((top[idx, None, None] + np.arange(height, dtype=np.float32)[None, :, None] + 0.5) * pw).astype(np.float32)
        out[idx] = painter(params.take(idx), _Canvas(X, Y, pw, (len(idx), height, width)))
    return np.clip(out, 0.0, 1.0)


def render(params: SceneParams, size: int) -> np.ndarray:
    """Render scenes at size x size: float32 [N, size, size, 3] in [0, 1], deterministic given params."""
    return render_region(params, size)


# ----------------------------------------------------------------------------
# Batches for training and previews.


def render_batch(seed: int, n: int, size: int, labels=None, dtype=np.uint8):
    """(images [n,size,size,3] uint8 (or float32 in [0,1]), labels int64), deterministic per seed."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n) if labels is None else np.broadcast_to(np.asarray(labels, np.int64), (n,))
    img = render(sample_params(rng, labels), size)
    if np.dtype(dtype) == np.uint8:
        img = (img * 255 + 0.5).astype(np.uint8)
    return img, np.asarray(labels, np.int64).copy()


def to_model_space(images) -> torch.Tensor:
    """Images [N,H,W,3] (uint8 or float in [0,1]) -> float32 NCHW tensor in [-1, 1]."""
    images = np.asarray(images)
    x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))) * 2 - 1


class Batch(NamedTuple):
    """A training batch: images, labels, and optionally the same images at low resolution."""

    x: torch.Tensor  # [B,3,H,W] float32 in [-1, 1]
    labels: torch.Tensor  # [B] int64
    low: torch.Tensor | None  # [B,3,h,w] in [-1, 1]: the same scenes at low resolution, or None


def scene_batches(seed: int, batch_size: int, size: int, low_res: int | None = None) -> Iterator[Batch]:
    """Endless random batches of scenes; with low_res, `low` is the same scenes rendered (not resized) at low_res."""
    rng = np.random.default_rng(seed)
    while True:
        labels = rng.integers(0, NUM_CLASSES, batch_size)
        params = sample_params(rng, labels)
        x = to_model_space(render(params, size))
        low = to_model_space(render(params, low_res)) if low_res else None
        yield Batch(x, torch.from_numpy(labels.astype(np.int64)), low)


class CropBatch(NamedTuple):
    high: torch.Tensor  # [B,3,hr_crop,hr_crop] crop of the lr_size*scale render, in [-1, 1]
    low: torch.Tensor  # [B,3,hr_crop/scale,hr_crop/scale] aligned crop of the lr_size render
    labels: torch.Tensor  # [B] int64


def paired_crops(
    seed: int, batch_size: int, hr_crop: int = 32, scale: int = 4, lr_size: int = 32
) -> Iterator[CropBatch]:
    """Endless aligned (high-res crop, low-res crop) pairs of the same scenes, for upsampler training.

    The low-res crop covers exactly the same scene area as the high-res crop:
    low = render(p, lr_size)[i:i+c, j:j+c], high = render(p, lr_size*scale)[i*scale:(i+c)*scale, ...].
    Only the crop windows are rendered.
    """
    if hr_crop % scale:
        raise ValueError(f"hr_crop={hr_crop} must be a multiple of scale={scale}")
    lr_crop = hr_crop // scale
    if lr_crop > lr_size:
        raise ValueError(f"crop of {lr_crop} low-res pixels does not fit in lr_size={lr_size}")
    rng = np.random.default_rng(seed)
    while True:
        labels = rng.integers(0, NUM_CLASSES, batch_size)
        params = sample_params(rng, labels)
        i = rng.integers(0, lr_size - lr_crop + 1, batch_size)
        j = rng.integers(0, lr_size - lr_crop + 1, batch_size)
        low = render_region(params, lr_size, i, j, lr_crop, lr_crop)
        high = render_region(params, lr_size * scale, i * scale, j * scale, hr_crop, hr_crop)
        yield CropBatch(to_model_space(high), to_model_space(low), torch.from_numpy(labels.astype(np.int64)))


def preview_grid(seed: int = 0, per_class: int = 8, size: int = 32, zoom: int = 4, high: int = 128) -> np.ndarray:
    """uint8 picture: a row of `per_class` scenes per class at `size` px (nearest x zoom), then a row at `high` px."""
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    params = sample_params(np.random.default_rng(seed), labels)
    cell = size * zoom
    grid = render(params, size).reshape(NUM_CLASSES, per_class, size, size, 3).repeat(zoom, 2).repeat(zoom, 3)
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(NUM_CLASSES * cell, per_class * cell, 3)
    row = render(params.take(np.arange(0, len(labels), per_class)), high)  # first scene of each class
    row = row.transpose(1, 0, 2, 3).reshape(high, NUM_CLASSES * high, 3)
    width = max(grid.shape[1], row.shape[1])
    pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)), constant_values=1.0)  # noqa: E731
    out = np.concatenate([pad(grid), np.ones((zoom * 2, width, 3), np.float32), pad(row)])
    return (out * 255 + 0.5).astype(np.uint8)
