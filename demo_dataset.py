"""Built-in demo dataset: generated Corel-like scene photos with multi-label annotations (no download).

`python main.py --data demo ...` calls `ensure_demo_dataset(root)`, which generates, once, under `root`:

    images/<id>.jpeg        RGB JPEG (quality 90), 192x128 (W x H) landscape or, for ~20 %, 128x192 portrait
    train.json, test.json   {"samples": [{"image_name": "000000.jpeg", "image_labels": ["sky", "sun"]}, ...],
                             "labels": [...DEMO_LABELS...]}   (exactly the Corel-5k format, same "labels" in both)
    demo_vocabulary.txt     the vocabulary, one label a line (like corel5k_vocabulary.txt)
    demo.json               the manifest: generator version, seed, sizes; written last, it marks the set complete

Scene model
-----------
Image k of a dataset generated with seed s is a pure function of (s, k): its own RNGs are
`numpy.random.default_rng([s, k, stream])`, one stream for the label sampler and one for each drawn object
kind, so images can be generated in any order or in parallel, the first n images of a larger set equal a set
of n images, and no global RNG state is touched. Train images have ids 0..n_train-1 and test images
n_train..n_train+n_test-1.

1. Sampling (`sample_scene_labels`, vectorised, no drawing). A scene type is drawn from `SCENE_PROBS`
   (beach, lake, mountain, city, forest, field, night, snow, underwater); each label is then an independent
   Bernoulli draw with the scene's rate `SCENE_LABEL_RATES[scene][label]`, and finally the structural
   constraints are enforced: a label is dropped while none of its `REQUIRES` alternatives is present or one
   of its `FORBIDS` labels is (sun, clouds, bird, rainbow need sky; moon and stars need night; boat, bridge
   and sand need water; car needs road; fish lives under water with nothing but water and coral; grass and
   snow exclude each other...). So co-occurrence is real and exact: P(sky | sun) = P(water | boat) =
   P(road | car) = P(night | stars) = 1, and it is also soft through the scenes (snow lifts mountain ~2.5x).
2. Drawing (`render_scene`, PIL ImageDraw + numpy). Layers go back to front: sky or night gradient (or,
   without sky, a forest canopy / building facade backdrop), rainbow, mountains with snow caps, ground bands
   from the horizon down (water, snow, grass, sand, road; plain unlabelled ground if none), bridge,
   buildings, trees, houses, boats, fence, flowers, cars, people; then the sky objects: stars (only on sky
   pixels nothing else covers), clouds, sun and moon (over clouds), birds. Every shape is also drawn, with
   its label's id, on an owner map; a label is listed iff its object is visible: a scene in which a listed
   label shows fewer than MIN_VISIBLE_PIXELS pixels is laid out again (about 1 scene in 1000), and no
   unlisted object is ever drawn. Every cue is a large colour + shape that survives a 64x64 downscale:
   yellow disc (sun), pale disc on a dark sky (moon), bright dots on a dark sky (stars), 7-band arc
   (rainbow), dark V's (birds), grey-purple triangles (mountains), white band + caps (snow), blue band with
   ripples (water), brown hull + white sail (boat), brick deck on pillars (bridge), orange fish with tail on
   a teal frame (fish), pink branches (coral), beige band (sand), green band (grass), coloured dots on grass
   (flowers), dark green cones or round crowns on trunks (tree), posts + rails (fence), wall + red roof
   (house), grey blocks with yellow windows (building), grey band with a dashed line (road), bright box on
   wheels (car), head + shirt + legs (people). Nuisance: positions, sizes, counts, colour jitter, horizon
   height, global brightness/colour gain and Gaussian pixel noise.

Label statistics (expected rates, `expected_label_rates()`, 200k draws)
--------------------------------------------------------------------------
25 labels, long-tailed: sky 53 %, tree 41 %, water 39 %, grass 32 %, clouds 23 %, mountain 22 %,
building 18 %, people 16 %, snow 16 %, sand 15 %, sun 15 %, road 12 %, boat 11 %, bird 10 %, night 10 %,
house 10 %, car 8 %, fence 8 %, flowers 8 %, stars 6 %, moon 6 %, fish 5 %, bridge 4 %, rainbow 2 %,
coral 1.8 %; most / least frequent ~30; 3.9 labels per image (Corel-5k: 3.4); 20 % portrait images.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from utils import atomic_write_bytes, atomic_write_text

GENERATOR_VERSION = 1

DEMO_LABELS: tuple[str, ...] = (
    "sky", "night", "clouds", "sun", "moon", "stars", "rainbow", "bird", "mountain", "snow", "water", "boat",
    "bridge", "fish", "coral", "sand", "grass", "flowers", "tree", "fence", "house", "building", "road", "car",
    "people",
)
_LABEL_INDEX = {name: i for i, name in enumerate(DEMO_LABELS)}

SCENES: tuple[str, ...] = ("beach", "lake", "mountain", "city", "forest", "field", "night", "snow", "underwater")
SCENE_PROBS: tuple[float, ...] = (0.15, 0.13, 0.12, 0.13, 0.11, 0.13, 0.10, 0.08, 0.05)
PORTRAIT_RATE = 0.2
LANDSCAPE_SIZE = (192, 128)  # (W, H)
PORTRAIT_SIZE = (128, 192)

# P(label | scene) before the constraints below; absent labels have rate 0.
SCENE_LABEL_RATES: dict[str, dict[str, float]] = {
    "beach": {"sky": .70, "clouds": .50, "sun": .40, "bird": .25, "rainbow": .04, "water": 1., "sand": 1.,
              "boat": .40, "people": .40, "tree": .15},
    "lake": {"sky": .60, "clouds": .45, "sun": .25, "bird": .20, "rainbow": .05, "mountain": .40, "snow": .05,
             "water": 1., "boat": .35, "bridge": .20, "grass": .55, "tree": .60, "house": .15, "people": .10,
             "flowers": .05},
    "mountain": {"sky": 1., "clouds": .50, "sun": .25, "bird": .20, "rainbow": .03, "mountain": 1., "snow": .50,
                 "grass": .40, "tree": .45, "water": .10, "house": .10, "fence": .05},
    "city": {"sky": .50, "clouds": .30, "sun": .15, "bird": .15, "building": 1., "road": .70, "car": .75,
             "people": .35, "tree": .25, "water": .10, "bridge": .30, "grass": .10},
    "forest": {"sky": .30, "clouds": .20, "sun": .10, "bird": .25, "tree": 1., "grass": .70, "flowers": .25,
               "house": .15, "fence": .10, "people": .10, "mountain": .10, "snow": .05},
    "field": {"sky": .60, "clouds": .45, "sun": .35, "bird": .20, "rainbow": .12, "grass": 1., "flowers": .45,
              "fence": .40, "house": .30, "tree": .35, "people": .15, "road": .10, "car": .50, "mountain": .15},
    "night": {"night": 1., "moon": .55, "stars": .60, "building": .45, "water": .35, "mountain": .30, "tree": .25,
              "road": .15, "car": .50, "bridge": .20, "boat": .10, "snow": .05, "grass": .10, "house": .10},
    "snow": {"sky": .60, "clouds": .35, "sun": .30, "bird": .05, "mountain": .50, "snow": 1., "tree": .55,
             "house": .30, "people": .35, "fence": .20, "road": .05, "car": .50},
    "underwater": {"water": 1., "fish": 1., "coral": .35},
}

# A label stays only if at least one of its REQUIRES alternatives is present ...
REQUIRES: dict[str, tuple[str, ...]] = {
    "clouds": ("sky",), "sun": ("sky",), "rainbow": ("sky",), "bird": ("sky",),
    "moon": ("night",), "stars": ("night",), "mountain": ("sky", "night"),
    "boat": ("water",), "bridge": ("water",), "sand": ("water",), "fish": ("water",), "coral": ("fish",),
    "flowers": ("grass",), "fence": ("grass", "snow"), "house": ("grass", "snow"), "car": ("road",),
    "people": ("sand", "grass", "snow", "road"),
}
# ... and none of its FORBIDS labels is present (fish: the underwater frame holds only water and coral).
FORBIDS: dict[str, tuple[str, ...]] = {
    "night": ("sky",), "grass": ("snow",),
    "fish": tuple(name for name in DEMO_LABELS if name not in ("fish", "water", "coral")),
}

# Uniform columns one image's label sampling consumes: scene, orientation, one per label.
N_UNIFORMS = 2 + len(DEMO_LABELS)
# Stream ids: 1 + index in _STREAMS for the painters, _SAMPLER_STREAM for the labels; never 0, because
# SeedSequence pads with zeros, so [s, k, 0] would seed the same stream as [s, k].
_SAMPLER_STREAM = 100
_STREAMS = ("layout", "sky", "rainbow", "mountain", "bands", "bridge", "building", "tree", "house", "boat",
            "fence", "flowers", "car", "people", "fish", "coral", "stars", "clouds", "sun", "moon", "bird", "post")
MARKER_NAME = "demo.json"
# A listed label must show at least this many pixels (1/6 of them survive a 64x64 downscale of 192x128).
MIN_VISIBLE_PIXELS = 120
_MAX_ATTEMPTS = 20
_IMAGE_NAME = re.compile(r"^\d+\.jpeg$")


def _relation_matrix(relation: dict[str, tuple[str, ...]]) -> np.ndarray:
    """(L, L) 0/1 matrix M with M[child, other] = 1 iff `other` is listed for `child` in `relation`."""
    m = np.zeros((len(DEMO_LABELS), len(DEMO_LABELS)), dtype=np.int64)
    for child, others in relation.items():
        m[_LABEL_INDEX[child], [_LABEL_INDEX[o] for o in others]] = 1
    return m


_RATES = np.array([[SCENE_LABEL_RATES[s].get(name, 0.0) for name in DEMO_LABELS] for s in SCENES])  # (S, L)
_REQ = _relation_matrix(REQUIRES)  # (L, L)
_FORB = _relation_matrix(FORBIDS)  # (L, L)
_HAS_REQ = _REQ.any(axis=1)  # (L,)
_SCENE_CDF = np.cumsum(SCENE_PROBS)


def sample_scene_labels(uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scene type, label set and orientation of n images from their uniform draws (vectorised, no drawing).

    uniforms: (n, N_UNIFORMS) floats in [0, 1). Column 0 picks the scene by inverse CDF of SCENE_PROBS,
    column 1 the orientation (portrait iff u < PORTRAIT_RATE), column 2 + j label j:
        raw[i, j] = u[i, 2 + j] < SCENE_LABEL_RATES[scene_i][label_j],
    then labels are removed until the fixed point of
        keep[i, j] = raw[i, j] and (no REQUIRES for j or any required alternative kept)
                                and no FORBIDS label of j kept.
    Returns scene index (n,) int, labels (n, L) bool in DEMO_LABELS order, portrait (n,) bool.
    """
    u = np.asarray(uniforms, dtype=np.float64)
    if u.ndim != 2 or u.shape[1] != N_UNIFORMS or not np.all((u >= 0) & (u < 1)):
        raise ValueError(f"sample_scene_labels needs an (n, {N_UNIFORMS}) array of uniforms in [0, 1), "
                         f"got shape {u.shape} (values in [{u.min(initial=0):.3g}, {u.max(initial=0):.3g}]); "
                         f"draw it with rng.random((n, N_UNIFORMS)).")
    scene = np.minimum(np.searchsorted(_SCENE_CDF, u[:, 0], side="right"), len(SCENES) - 1)  # (n,)
    portrait = u[:, 1] < PORTRAIT_RATE  # (n,)
    labels = u[:, 2:] < _RATES[scene]  # (n, L)
    # Removing labels only shrinks the set, so this reaches its fixed point in at most L passes (a removal can
    # orphan a child, e.g. snow removes grass, which then removes flowers: 2-3 passes in practice).
    for _ in range(len(DEMO_LABELS)):
        present = labels.astype(np.int64)  # (n, L)
        required_ok = ~_HAS_REQ | ((present @ _REQ.T) > 0)  # (n, L)
        not_forbidden = (present @ _FORB.T) == 0  # (n, L)
        kept = labels & required_ok & not_forbidden
        if np.array_equal(kept, labels):
            break
        labels = kept
    return scene, labels, portrait


def expected_label_rates(n_draws: int = 200_000, seed: int = 12345) -> dict[str, float]:
    """Monte-Carlo estimate of P(label) under the sampler: mean over n_draws of sample_scene_labels rows."""
    uniforms = np.random.default_rng(seed).random((n_draws, N_UNIFORMS))
    _, labels, _ = sample_scene_labels(uniforms)
    return dict(zip(DEMO_LABELS, labels.mean(axis=0).tolist()))


def check_label_set(labels: Iterable[str]) -> frozenset[str]:
    """The labels as a frozenset, after checking they are known and satisfy REQUIRES and FORBIDS."""
    present = frozenset(labels)
    unknown = sorted(present - set(DEMO_LABELS))
    if unknown:
        raise ValueError(f"Unknown demo labels {unknown}; the vocabulary is DEMO_LABELS = {list(DEMO_LABELS)}.")
    if not present:
        raise ValueError("A demo scene needs at least one label; got an empty label set.")
    for name in sorted(present):
        if name in REQUIRES and not present & set(REQUIRES[name]):
            raise ValueError(f"Label '{name}' needs one of {list(REQUIRES[name])} in the same scene "
                             f"(got {sorted(present)}); add one or drop '{name}'.")
        if name in FORBIDS and present & set(FORBIDS[name]):
            raise ValueError(f"Label '{name}' cannot be drawn with {sorted(present & set(FORBIDS[name]))} "
                             f"(got {sorted(present)}); drop one of them.")
    return present


def image_spec(seed: int, index: int) -> tuple[tuple[str, ...], bool]:
    """Labels (in DEMO_LABELS order) and orientation (True = portrait) of image `index` for `seed`, no drawing."""
    u = np.random.default_rng([seed, index, _SAMPLER_STREAM]).random((1, N_UNIFORMS))  # (1, N_UNIFORMS)
    _, labels, portrait = sample_scene_labels(u)
    return tuple(DEMO_LABELS[j] for j in np.flatnonzero(labels[0])), bool(portrait[0])


# ----------------------------------------------------------------------------------------------- drawing


def _jitter(rng: np.random.Generator, rgb: Sequence[int], amount: int = 12) -> tuple[int, int, int]:
    """rgb + independent uniform integer offsets in [-amount, amount], clipped to [0, 255]."""
    out = np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, size=3), 0, 255)
    return tuple(int(c) for c in out)


def _pick(rng: np.random.Generator, options: Sequence[Sequence[int]], amount: int = 12) -> tuple[int, int, int]:
    return _jitter(rng, options[int(rng.integers(len(options)))], amount)


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high)) if high > low else float(low)


def _gradient(top: Sequence[int], bottom: Sequence[int], height: int, width: int) -> np.ndarray:
    """(height, width, 3) float image blending `top` (row 0) linearly into `bottom` (last row)."""
    t = np.linspace(0.0, 1.0, max(height, 1))[:, None]  # (h, 1)
    rows = (1 - t) * np.asarray(top, float) + t * np.asarray(bottom, float)  # (h, 3)
    return np.broadcast_to(rows[:, None, :], (height, width, 3)).copy()


class _Pen:
    """Draws each shape twice: in colour on the image and, with the label's id, on the owner map."""

    def __init__(self, image_draw: ImageDraw.ImageDraw, owner_draw: ImageDraw.ImageDraw, owner_id: int):
        self._image, self._owner, self._id = image_draw, owner_draw, owner_id

    def _both(self, method: str, *args, **kwargs) -> None:
        getattr(self._image, method)(*args, **kwargs)
        getattr(self._owner, method)(*args, **{**kwargs, "fill": self._id})

    def rectangle(self, *args, **kwargs) -> None:
        self._both("rectangle", *args, **kwargs)

    def ellipse(self, *args, **kwargs) -> None:
        self._both("ellipse", *args, **kwargs)

    def polygon(self, *args, **kwargs) -> None:
        self._both("polygon", *args, **kwargs)

    def line(self, *args, **kwargs) -> None:
        self._both("line", *args, **kwargs)

    def arc(self, *args, **kwargs) -> None:
        self._both("arc", *args, **kwargs)

    def point(self, *args, **kwargs) -> None:
        self._both("point", *args, **kwargs)


class _Canvas:
    """Image, owner map (which label each pixel shows) and geometry shared by the painters of one scene."""

    def __init__(self, labels: frozenset[str], portrait: bool, seed_parts: tuple[int, ...]):
        self.labels = labels
        self.w, self.h = PORTRAIT_SIZE if portrait else LANDSCAPE_SIZE
        self.seed_parts = seed_parts
        self.image: Image.Image | None = None
        self.owner: Image.Image | None = None  # mode "L": 1 + DEMO_LABELS index of the label drawn last, 0 = none
        self.background: np.ndarray | None = None  # (H, W, 3) uint8, the sky before anything is drawn on it
        self.hy = 0  # horizon row: sky (or the canopy / facade backdrop) above, ground bands below
        self.bands: dict[str, tuple[int, int]] = {}  # band name -> (y0, y1), top to bottom, covering [hy, H)

    def start(self, background: np.ndarray, owner: np.ndarray) -> None:
        """Begin from a (H, W, 3) uint8 background whose pixels belong to the (H, W) uint8 owner ids."""
        self.background = background
        self.image = Image.fromarray(background.copy())
        self.owner = Image.fromarray(owner)

    def pen(self, label: str | None) -> _Pen:
        """Drawer whose shapes are owned by `label` (None: unlabelled, e.g. plain ground)."""
        owner_id = 0 if label is None else 1 + _LABEL_INDEX[label]
        return _Pen(ImageDraw.Draw(self.image), ImageDraw.Draw(self.owner), owner_id)

    def rng(self, stream: str) -> np.random.Generator:
        """The object kind's own RNG: drawing one kind never shifts the random numbers of another."""
        return np.random.default_rng([*self.seed_parts, 1 + _STREAMS.index(stream)])

    def has(self, *names: str) -> bool:
        return any(n in self.labels for n in names)

    def band(self, *names: str, last: bool = False) -> tuple[int, int] | None:
        """(y0, y1) of the first (or last = nearest) present band among `names`, None if none is present."""
        found = [self.bands[n] for n in self.bands if n in names]
        return (found[-1] if last else found[0]) if found else None


def _layout(c: _Canvas) -> None:
    """Horizon height and ground bands (far to near: water, snow, grass, sand, road; plain ground if none)."""
    u = c.rng("layout").random(8)
    if c.has("sky", "night"):
        hy = int(c.h * (0.42 + 0.18 * u[0]))
    elif c.has("building", "tree"):  # no sky: a facade / forest canopy backdrop fills the top
        hy = int(c.h * (0.35 + 0.20 * u[0]))
    else:  # close-up: the ground fills the frame
        hy = 0
    names = [b for b in ("water", "snow", "grass", "sand", "road") if b in c.labels] or ["plain"]
    min_h = {"water": 18, "snow": 16, "grass": 16, "sand": 16, "road": 26, "plain": 16}
    base_w = {"water": 1.3, "snow": 1.0, "grass": 1.0, "sand": 0.8, "road": 0.7, "plain": 1.0}
    need = sum(min_h[b] for b in names)
    if hy > 0:
        hy = min(hy, c.h - need - 8)
    weights = np.array([base_w[b] for b in names]) * (0.6 + 0.8 * u[2:2 + len(names)])  # (nb,)
    extra = (c.h - hy) - need
    heights = [min_h[b] + int(extra * w / weights.sum()) for b, w in zip(names, weights)]
    heights[-1] = c.h - hy - sum(heights[:-1])  # the nearest band takes the rounding remainder
    y = hy
    for b, bh in zip(names, heights):
        c.bands[b] = (y, y + bh)
        y += bh
    c.hy = hy


def _paint_background(c: _Canvas) -> None:
    """Sky / night gradient (or canopy / facade backdrop) above the horizon; ground left for the bands."""
    rng = c.rng("sky")
    arr = np.zeros((c.h, c.w, 3))
    owner = np.zeros((c.h, c.w), dtype=np.uint8)  # (H, W)
    if c.hy > 0:
        # The canopy backdrop shows foliage (tree); the facade backdrop is fully covered by buildings.
        top_label = "sky" if c.has("sky") else "night" if c.has("night") else None if c.has("building") else "tree"
        if top_label is not None:
            owner[:c.hy] = 1 + _LABEL_INDEX[top_label]
        if c.has("sky"):
            top, bottom = _jitter(rng, (55, 115, 215), 15), _jitter(rng, (165, 205, 240), 12)
        elif c.has("night"):
            top, bottom = _jitter(rng, (8, 10, 32), 6), _jitter(rng, (30, 38, 80), 8)
        elif c.has("building"):
            top, bottom = (70, 70, 76), (90, 90, 96)
        else:  # canopy: dark foliage between the trunks
            top, bottom = _jitter(rng, (20, 55, 25), 8), _jitter(rng, (35, 80, 35), 8)
        arr[:c.hy] = _gradient(top, bottom, c.hy, c.w)
    c.start(arr.round().astype(np.uint8), owner)


def _paint_rainbow(c: _Canvas) -> None:
    rng = c.rng("rainbow")
    d = c.pen("rainbow")
    colours = ((230, 40, 40), (245, 140, 30), (245, 225, 40), (60, 180, 60), (50, 110, 230), (75, 50, 170),
               (150, 60, 200))
    radius = _uniform(rng, 0.45, 0.70) * c.w
    apex = _uniform(rng, 0.08, 0.25) * c.hy  # apex row stays above mountains (>= 0.4 hy) and most buildings
    cx = _uniform(rng, 0.25, 0.75) * c.w
    cy = apex + radius
    for k, rgb in enumerate(colours):  # outer red to inner violet, 3 px a band, width 4 so bands leave no gaps
        r = radius - 3 * k
        d.arc((cx - r, cy - r, cx + r, cy + r), 180, 360, fill=_jitter(rng, rgb, 10), width=4)


def _paint_mountains(c: _Canvas) -> None:
    rng = c.rng("mountain")
    d = c.pen("mountain")
    for _ in range(int(rng.integers(1, 4))):
        peak_h = _uniform(rng, 0.35, 0.60) * c.hy
        px = _uniform(rng, 0.1, 0.9) * c.w
        left, right = _uniform(rng, 0.3, 0.6) * c.w, _uniform(rng, 0.3, 0.6) * c.w
        top = c.hy - peak_h
        d.polygon([(px - left, c.hy + 1), (px, top), (px + right, c.hy + 1)],
                       fill=_pick(rng, ((110, 105, 135), (125, 115, 110), (95, 105, 125)), 10))
        if c.has("snow"):  # white cap over the top 30-45 % of the slope
            f = _uniform(rng, 0.30, 0.45)
            d.polygon([(px, top), (px + right * f, top + peak_h * f), (px + right * f * 0.3, top + peak_h * f * 0.75),
                            (px - left * f * 0.3, top + peak_h * f * 0.8), (px - left * f, top + peak_h * f)],
                           fill=_jitter(rng, (242, 245, 250), 6))


def _paint_bands(c: _Canvas) -> None:
    rng = c.rng("bands")
    for name, (y0, y1) in c.bands.items():
        d = c.pen(None if name == "plain" else name)
        if name == "water":
            d.rectangle((0, y0, c.w, y1), fill=_jitter(rng, (45, 105, 185), 15))
            light = _jitter(rng, (120, 170, 225), 10)
            for _ in range(int(rng.integers(4, 9))):  # ripples
                x, y = _uniform(rng, 0, c.w), _uniform(rng, y0 + 2, y1 - 2)
                d.line((x, y, x + _uniform(rng, 10, 24), y), fill=light, width=2)
        elif name == "snow":
            d.rectangle((0, y0, c.w, y1), fill=_jitter(rng, (238, 242, 250), 6))
            for _ in range(int(rng.integers(2, 5))):  # blue shadows
                x, y = _uniform(rng, 0, c.w), _uniform(rng, y0 + 3, y1 - 3)
                d.ellipse((x - 14, y - 2, x + 14, y + 2), fill=_jitter(rng, (205, 218, 240), 6))
        elif name == "grass":
            d.rectangle((0, y0, c.w, y1), fill=_jitter(rng, (85, 160, 65), 15))
            dark = _jitter(rng, (55, 125, 45), 8)
            for _ in range(int(rng.integers(15, 30))):  # blades
                x, y = _uniform(rng, 0, c.w), _uniform(rng, y0 + 3, y1)
                d.line((x, y, x + _uniform(rng, -2, 2), y - 4), fill=dark, width=1)
        elif name == "sand":
            d.rectangle((0, y0, c.w, y1), fill=_jitter(rng, (222, 200, 150), 10))
            speck = _jitter(rng, (190, 165, 120), 8)
            for _ in range(int(rng.integers(20, 40))):
                x, y = _uniform(rng, 0, c.w), _uniform(rng, y0, y1)
                d.rectangle((x, y, x + 1, y + 1), fill=speck)
        elif name == "road":
            d.rectangle((0, y0, c.w, y1), fill=_jitter(rng, (72, 72, 76), 8))
            line = _pick(rng, ((240, 210, 60), (240, 240, 240)), 8)
            ym, dash, gap = (y0 + y1) / 2, _uniform(rng, 12, 18), _uniform(rng, 8, 12)
            x = -_uniform(rng, 0, dash + gap)
            while x < c.w:
                d.rectangle((x, ym - 1, x + dash, ym + 2), fill=line)
                x += dash + gap
        else:  # plain ground, no label
            d.rectangle((0, y0, c.w, y1), fill=_jitter(rng, (110, 95, 70), 10))


def _paint_bridge(c: _Canvas) -> None:
    rng = c.rng("bridge")
    d = c.pen("bridge")
    y0, y1 = c.bands["water"]
    deck = y0 + 1 + _uniform(rng, 0, max(0.0, 0.3 * (y1 - y0) - 1))
    xa, xb = _uniform(rng, -10, 0.15 * c.w), _uniform(rng, 0.85 * c.w, c.w + 10)
    brick, dark = _jitter(rng, (160, 80, 55), 12), _jitter(rng, (110, 55, 40), 10)
    n_pillars = int(rng.integers(3, 5))
    for x in np.linspace(xa + 8, xb - 15, n_pillars):
        d.rectangle((x, deck + 6, x + 7, min(y1, deck + 24)), fill=dark)
    d.rectangle((xa, deck, xb, deck + 6), fill=brick)
    d.line((xa, deck - 4, xb, deck - 4), fill=dark, width=2)  # railing
    for x in np.arange(xa, xb, 9.0):
        d.line((x, deck - 4, x, deck), fill=dark, width=2)


def _paint_buildings(c: _Canvas) -> None:
    rng = c.rng("building")
    d = c.pen("building")
    blocks = []  # (x0, top, x1)
    if c.has("sky", "night"):
        for _ in range(int(rng.integers(2, 6))):
            bw = _uniform(rng, 20, 36)
            x0 = _uniform(rng, -5, c.w - bw + 5)
            blocks.append((x0, c.hy - _uniform(rng, 0.35, 0.80) * c.hy, x0 + bw))
    else:  # facade backdrop: buildings side by side across the frame, tops above the image
        x = -_uniform(rng, 0, 10)
        while x < c.w:
            bw = _uniform(rng, 24, 40)
            blocks.append((x, -5.0, x + bw))
            x += bw + 2
    window_options = ((245, 220, 110), (250, 235, 150), (240, 200, 90))
    for x0, top, x1 in blocks:
        d.rectangle((x0, top, x1, c.hy + 1), fill=_jitter(rng, (138, 138, 142), 28))
        lit = _pick(rng, window_options, 8)
        xs = np.arange(x0 + 4, x1 - 7, 8.0)
        ys = np.arange(max(top, -5.0) + 4, c.hy - 8, 9.0)
        for wx in xs:
            for wy in ys:
                d.rectangle((wx, wy, wx + 4, wy + 5), fill=lit)


def _paint_trees(c: _Canvas) -> None:
    rng = c.rng("tree")
    d = c.pen("tree")
    land = c.band("grass", "snow", "sand", "plain")
    backdrop = not c.has("sky", "night")
    n = int(rng.integers(3, 7)) if backdrop else int(rng.integers(1, 6))
    for _ in range(n):
        if land is not None:
            y0, y1 = land
            root = _uniform(rng, y0 + 0.2 * (y1 - y0), y1 - 2)
        else:  # on the far shore / beside the road, at the horizon
            root = c.hy + _uniform(rng, 0, 3)
        height = _uniform(rng, 30, 52) * (1.4 if backdrop else 1.0)
        x = _uniform(rng, 0.05, 0.95) * c.w
        trunk = _jitter(rng, (95, 65, 40), 10)
        if rng.random() < 0.5:  # conifer: three stacked triangles
            half = 0.3 * height
            d.rectangle((x - 2, root - 0.25 * height, x + 2, root), fill=trunk)
            green = _jitter(rng, (30, 95, 45), 12)
            for k in range(3):
                base = root - 0.18 * height - k * 0.25 * height
                hw = half * (1 - 0.22 * k)
                d.polygon([(x - hw, base), (x, base - 0.42 * height), (x + hw, base)], fill=green)
        else:  # deciduous: round crown on a trunk
            r = 0.33 * height
            d.rectangle((x - 2.5, root - 0.5 * height, x + 2.5, root), fill=trunk)
            cy = root - height + r
            d.ellipse((x - r, cy - r, x + r, cy + r), fill=_jitter(rng, (50, 120, 45), 12))
            d.ellipse((x - 0.5 * r, cy - 0.7 * r, x + 0.3 * r, cy), fill=_jitter(rng, (75, 145, 60), 10))


def _paint_houses(c: _Canvas) -> None:
    rng = c.rng("house")
    d = c.pen("house")
    y0, y1 = c.band("grass", "snow")
    for _ in range(int(rng.integers(1, 3))):
        root = _uniform(rng, y0 + 0.4 * (y1 - y0), y1 - 2)
        ww, wh, rh = _uniform(rng, 26, 36), _uniform(rng, 18, 24), _uniform(rng, 12, 16)
        x = _uniform(rng, 2, c.w - ww - 2)
        d.rectangle((x, root - wh, x + ww, root), fill=_pick(rng, ((235, 225, 200), (240, 215, 150),
                                                                          (200, 215, 235)), 10))
        d.polygon([(x - 3, root - wh), (x + ww / 2, root - wh - rh), (x + ww + 3, root - wh)],
                       fill=_jitter(rng, (170, 55, 40), 15))
        d.rectangle((x + 0.2 * ww, root - 11, x + 0.2 * ww + 7, root), fill=(80, 50, 35))
        d.rectangle((x + 0.6 * ww, root - wh + 5, x + 0.6 * ww + 6, root - wh + 11), fill=(110, 150, 190))


def _paint_boats(c: _Canvas) -> None:
    rng = c.rng("boat")
    d = c.pen("boat")
    y0, y1 = c.bands["water"]
    for _ in range(int(rng.integers(1, 4))):
        hw, hh, sail = _uniform(rng, 26, 38), _uniform(rng, 7, 10), _uniform(rng, 18, 26)
        bottom = _uniform(rng, min(y0 + 10, y1 - 2), y1 - 1)
        x = _uniform(rng, hw / 2, c.w - hw / 2)
        deck = bottom - hh
        d.polygon([(x - hw / 2, deck), (x + hw / 2, deck), (x + hw / 2 - 5, bottom), (x - hw / 2 + 5, bottom)],
                       fill=_pick(rng, ((125, 75, 40), (150, 60, 45), (95, 60, 35)), 10))
        d.line((x, deck, x, deck - sail - 2), fill=(60, 45, 35), width=2)
        white = _jitter(rng, (245, 245, 240), 8)
        d.polygon([(x + 2, deck - sail - 1), (x + 2, deck - 2), (x + 0.75 * sail, deck - 2)], fill=white)
        d.polygon([(x - 2, deck - 0.8 * sail), (x - 2, deck - 2), (x - 0.4 * sail, deck - 2)], fill=white)


def _paint_fence(c: _Canvas) -> None:
    rng = c.rng("fence")
    d = c.pen("fence")
    y0, y1 = c.band("grass", "snow", last=True)
    height = _uniform(rng, 16, 22)
    root = _uniform(rng, min(y0 + height, y1 - 1), y1 - 1)
    xa = _uniform(rng, -5, 0.3 * c.w)
    xb = min(c.w + 5, xa + _uniform(rng, 0.55, 0.9) * c.w)
    options = ((130, 90, 55), (100, 70, 45)) if c.has("snow") else ((130, 90, 55), (238, 238, 230))
    wood = _pick(rng, options, 10)  # white fences only where they do not vanish into snow
    spacing = _uniform(rng, 10, 13)
    for x in np.arange(xa, xb, spacing):
        d.rectangle((x, root - height, x + 3, root), fill=wood)
    for f in (0.35, 0.75):
        d.line((xa, root - f * height, xb, root - f * height), fill=wood, width=3)


def _paint_flowers(c: _Canvas) -> None:
    rng = c.rng("flowers")
    d = c.pen("flowers")
    y0, y1 = c.bands["grass"]
    petals = ((230, 45, 55), (220, 80, 200), (160, 80, 220), (245, 140, 40), (250, 240, 245))
    width = _uniform(rng, 0.4, 0.9) * c.w
    xa = _uniform(rng, 0, c.w - width)
    for _ in range(int(rng.integers(8, 17))):
        x, y, r = _uniform(rng, xa + 4, xa + width - 4), _uniform(rng, y0 + 4, y1 - 3), _uniform(rng, 4, 5.5)
        d.ellipse((x - r, y - r, x + r, y + r), fill=_pick(rng, petals, 10))
        d.ellipse((x - r / 2.5, y - r / 2.5, x + r / 2.5, y + r / 2.5), fill=(250, 215, 40))


def _paint_cars(c: _Canvas) -> None:
    rng = c.rng("car")
    d = c.pen("car")
    y0, y1 = c.bands["road"]
    bodies = ((215, 35, 35), (40, 80, 215), (245, 200, 30), (240, 240, 240), (40, 160, 70))
    for _ in range(int(rng.integers(1, 4))):
        length, body_h, cab_h = _uniform(rng, 30, 40), _uniform(rng, 9, 11), _uniform(rng, 7, 9)
        bottom = _uniform(rng, min(y0 + 22, y1 - 1), y1 - 1)
        x = _uniform(rng, -5, c.w - length + 5)
        colour = _pick(rng, bodies, 12)
        axle = bottom - 4
        d.polygon([(x + 0.22 * length, axle - body_h), (x + 0.32 * length, axle - body_h - cab_h),
                        (x + 0.68 * length, axle - body_h - cab_h), (x + 0.8 * length, axle - body_h)], fill=colour)
        d.rectangle((x + 0.36 * length, axle - body_h - cab_h + 2, x + 0.64 * length, axle - body_h - 1),
                         fill=(170, 210, 235))
        d.rectangle((x, axle - body_h, x + length, axle), fill=colour)
        for wx in (x + 0.22 * length, x + 0.78 * length):
            d.ellipse((wx - 4, axle - 4, wx + 4, axle + 4), fill=(25, 25, 28))


def _paint_people(c: _Canvas) -> None:
    rng = c.rng("people")
    d = c.pen("people")
    y0, y1 = c.band("sand", "grass", "snow", "road", last=True)
    skins = ((240, 200, 170), (205, 150, 110), (140, 95, 65), (95, 65, 45))
    shirts = ((215, 40, 40), (40, 90, 210), (40, 160, 60), (240, 140, 30), (150, 50, 170), (240, 210, 40))
    for _ in range(int(rng.integers(1, 5))):
        height = _uniform(rng, 32, 42)
        root = _uniform(rng, min(y0 + 10, y1 - 1), y1 - 1)
        x = _uniform(rng, 6, c.w - 6)
        leg, body_h, body_w, head = 0.38 * height, 0.36 * height, 0.3 * height, 0.12 * height
        pants = _jitter(rng, (45, 45, 70), 15)
        d.line((x - 2.5, root, x - 2.5, root - leg), fill=pants, width=4)
        d.line((x + 2.5, root, x + 2.5, root - leg), fill=pants, width=4)
        d.rectangle((x - body_w / 2, root - leg - body_h, x + body_w / 2, root - leg), fill=_pick(rng, shirts))
        hc = root - leg - body_h - head
        d.ellipse((x - head, hc - head, x + head, hc + head), fill=_pick(rng, skins, 8))


def _paint_underwater(c: _Canvas) -> None:
    """The whole frame is water (teal gradient) with fish, and coral growing from the bottom edge."""
    rng = c.rng("sky")
    water = _gradient(_jitter(rng, (60, 170, 200), 12), _jitter(rng, (15, 75, 125), 10), c.h, c.w)
    c.start(water.round().astype(np.uint8), np.full((c.h, c.w), 1 + _LABEL_INDEX["water"], dtype=np.uint8))
    if c.has("coral"):
        rng = c.rng("coral")
        d = c.pen("coral")
        for _ in range(int(rng.integers(2, 5))):
            bx, colour = _uniform(rng, 0.05, 0.95) * c.w, _pick(rng, ((245, 110, 130), (235, 90, 170), (250, 140, 90)))
            for _ in range(int(rng.integers(4, 7))):
                tip_x, tip_y = bx + _uniform(rng, -16, 16), c.h - _uniform(rng, 25, 45)
                mid = (bx + 0.5 * (tip_x - bx) + _uniform(rng, -4, 4), (c.h + tip_y) / 2)
                d.line([(bx, c.h), mid, (tip_x, tip_y)], fill=colour, width=5, joint="curve")
    rng = c.rng("fish")
    pen = c.pen("fish")
    for _ in range(int(rng.integers(2, 6))):
        length = _uniform(rng, 22, 32)
        half_h = 0.24 * length
        x = _uniform(rng, length, c.w - length)
        y = _uniform(rng, 10, c.h - (55 if c.has("coral") else 12))
        d = 1 if rng.random() < 0.5 else -1  # head direction
        colour = _pick(rng, ((250, 140, 30), (250, 205, 40), (240, 95, 55)), 10)
        tail = x - d * length / 2
        pen.polygon([(tail + d * 3, y), (tail - d * 9, y - 8), (tail - d * 9, y + 8)], fill=colour)
        pen.ellipse((x - length / 2, y - half_h, x + length / 2, y + half_h), fill=colour)
        ex = x + d * length * 0.3
        pen.ellipse((ex - 1.5, y - 2.5, ex + 1.5, y + 0.5), fill=(20, 20, 20))


def _paint_stars(c: _Canvas) -> None:
    """Bright dots only on sky pixels nothing else was drawn on, so no star hides and none sits on a wall."""
    rng = c.rng("stars")
    arr = np.asarray(c.image)  # (H, W, 3)
    free = np.all(arr == c.background, axis=2)  # (H, W)
    free[c.hy:] = False
    free[:2], free[:, :2], free[:, -2:] = False, False, False
    cells = np.flatnonzero(free[:max(c.hy - 3, 0)])
    if cells.size == 0:
        raise RuntimeError("No free night-sky pixel left for the stars; the layout must keep the top of the sky free.")
    centres = rng.choice(cells, size=min(int(rng.integers(20, 36)), cells.size), replace=False)
    layer = c.image.copy()
    draw = ImageDraw.Draw(layer)
    stars = Image.new("L", (c.w, c.h), 0)
    star_draw = ImageDraw.Draw(stars)
    for flat in centres:
        y, x = divmod(int(flat), c.w)
        colour = _jitter(rng, (245, 245, 225), 10)
        draw.rectangle((x - 1, y - 1, x + 1, y + 1), fill=colour)
        draw.point([(x - 2, y), (x + 2, y), (x, y - 2), (x, y + 2)], fill=colour)
        star_draw.rectangle((x - 1, y - 1, x + 1, y + 1), fill=1)
        star_draw.point([(x - 2, y), (x + 2, y), (x, y - 2), (x, y + 2)], fill=1)
    merged = np.where(free[:, :, None], np.asarray(layer), arr)  # (H, W, 3)
    owner = np.asarray(c.owner).copy()  # (H, W)
    owner[free & (np.asarray(stars) > 0)] = 1 + _LABEL_INDEX["stars"]
    c.image = Image.fromarray(merged.astype(np.uint8))
    c.owner = Image.fromarray(owner)


def _sky_slot(rng: np.random.Generator, c: _Canvas, r: float) -> tuple[float, float]:
    """Centre of a disc of radius r in the upper sky, entirely above the horizon."""
    cx = _uniform(rng, r + 3, c.w - r - 3)
    cy = _uniform(rng, r + 3, max(r + 3, 0.35 * c.hy))
    return cx, cy


def _paint_sky_objects(c: _Canvas) -> None:
    """Clouds, then sun / moon (drawn over clouds, never under), then birds on top of everything."""
    discs = []  # (cx, cy, r, kind) of sun / moon, which clouds try to avoid
    if c.has("sun"):
        rng = c.rng("sun")
        r = _uniform(rng, 10, 14)
        discs.append((*_sky_slot(rng, c, r), r, "sun"))
    if c.has("moon"):
        rng = c.rng("moon")
        r = _uniform(rng, 9, 12)
        discs.append((*_sky_slot(rng, c, r), r, "moon"))
    if c.has("clouds"):
        rng = c.rng("clouds")
        pen = c.pen("clouds")
        for _ in range(int(rng.integers(1, 4))):
            cw, ch = _uniform(rng, 36, 54), _uniform(rng, 12, 18)
            for _ in range(12):  # prefer a place beside the sun; it is drawn over the cloud anyway
                x = _uniform(rng, cw / 2 - 6, c.w - cw / 2 + 6)
                if all(abs(x - dx) > cw / 2 + dr + 4 for dx, _, dr, _ in discs):
                    break
            y = _uniform(rng, ch / 2 + 2, max(ch / 2 + 2, 0.55 * c.hy - ch / 2))
            white, shade = _jitter(rng, (245, 247, 250), 6), _jitter(rng, (215, 222, 232), 6)
            pen.ellipse((x - cw / 2, y - ch * 0.1, x + cw / 2, y + ch / 2), fill=shade)
            for _ in range(int(rng.integers(3, 6))):
                px, pr = x + _uniform(rng, -0.3, 0.3) * cw, _uniform(rng, 0.3, 0.5) * ch
                pen.ellipse((px - pr * 1.3, y - pr, px + pr * 1.3, y + pr * 0.9), fill=white)
    for cx, cy, r, kind in discs:
        rng, pen = c.rng(kind), c.pen(kind)
        if kind == "sun":
            pen.ellipse((cx - r - 3, cy - r - 3, cx + r + 3, cy + r + 3), fill=_jitter(rng, (255, 235, 160), 6))
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_pick(rng, ((255, 220, 50), (255, 190, 40)), 6))
        else:
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_jitter(rng, (235, 232, 205), 8))
            for _ in range(2):  # craters
                kx, ky, kr = cx + _uniform(rng, -0.4, 0.4) * r, cy + _uniform(rng, -0.4, 0.4) * r, 0.22 * r
                pen.ellipse((kx - kr, ky - kr, kx + kr, ky + kr), fill=(200, 198, 180))
    if c.has("bird"):
        rng, pen = c.rng("bird"), c.pen("bird")
        shape = np.array([(-0.5, -0.3), (-0.22, -0.12), (0.0, 0.12), (0.22, -0.12), (0.5, -0.3)])  # (5, 2)
        for _ in range(int(rng.integers(2, 5))):
            s = _uniform(rng, 20, 28)
            bx, by = _uniform(rng, s / 2, c.w - s / 2), _uniform(rng, 0.3 * s + 3, max(0.3 * s + 3, 0.7 * c.hy))
            pts = shape * s + (bx, by)  # (5, 2)
            pen.line([tuple(p) for p in pts], fill=_jitter(rng, (35, 35, 45), 10), width=4, joint="curve")


def _finish(c: _Canvas) -> Image.Image:
    """Global colour gain g (3,) * brightness b, plus N(0, sigma^2) pixel noise: out = clip(img * g * b + n)."""
    rng = c.rng("post")
    gain = rng.uniform(0.94, 1.06, size=3) * rng.uniform(0.9, 1.1)  # (3,)
    sigma = rng.uniform(2.0, 5.0)
    arr = np.asarray(c.image, dtype=np.float32) * gain.astype(np.float32)  # (H, W, 3)
    arr += rng.normal(0.0, sigma, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB")


def _draw_scene(c: _Canvas) -> None:
    """Run the painters of the canvas's labels back to front."""
    if "fish" in c.labels:
        _paint_underwater(c)
        return
    _layout(c)
    _paint_background(c)
    painters = (("rainbow", _paint_rainbow), ("mountain", _paint_mountains), (None, _paint_bands),
                ("bridge", _paint_bridge), ("building", _paint_buildings), ("tree", _paint_trees),
                ("house", _paint_houses), ("boat", _paint_boats), ("fence", _paint_fence),
                ("flowers", _paint_flowers), ("car", _paint_cars), ("people", _paint_people),
                ("stars", _paint_stars), (None, _paint_sky_objects))
    for label, painter in painters:
        if label is None or label in c.labels:
            painter(c)


def visible_pixels(owner: np.ndarray) -> dict[str, int]:
    """Pixels each label shows in an owner map: count_j = #{p : owner[p] = 1 + j} (owner: (H, W) uint8)."""
    counts = np.bincount(np.asarray(owner, dtype=np.int64).ravel(), minlength=len(DEMO_LABELS) + 1)  # (L + 1,)
    return dict(zip(DEMO_LABELS, counts[1:].tolist()))


def render_scene(labels: Iterable[str], portrait: bool, seed_parts: Sequence[int],
                 return_owner: bool = False) -> Image.Image | tuple[Image.Image, np.ndarray]:
    """Draw the scene with exactly these labels; an RGB image, 192x128 (W x H), or 128x192 if portrait.

    Every object kind draws from its own RNG default_rng([*seed_parts, stream]), so removing one label
    leaves every other object where it was (unless it is a ground band, which moves the layout). A label is
    listed iff it is visible: if some label shows fewer than MIN_VISIBLE_PIXELS pixels (hidden behind other
    objects), the scene is laid out again with seed parts (*seed_parts, attempt), attempt = 1, 2, ...
    With return_owner, also returns the (H, W) uint8 owner map (1 + label index of each pixel, 0 = none).
    Raises ValueError if the labels break REQUIRES / FORBIDS (see check_label_set).
    """
    present = check_label_set(labels)
    seed_parts = tuple(int(s) for s in seed_parts)
    if any(s < 0 for s in seed_parts):
        raise ValueError(f"render_scene needs non-negative seed parts, got {seed_parts}.")
    for attempt in range(_MAX_ATTEMPTS):
        c = _Canvas(present, bool(portrait), seed_parts if attempt == 0 else (*seed_parts, attempt))
        _draw_scene(c)
        owner = np.asarray(c.owner)  # (H, W)
        counts = visible_pixels(owner)
        if all(counts[name] >= MIN_VISIBLE_PIXELS for name in present):
            image = _finish(c)
            return (image, owner) if return_owner else image
    hidden = sorted(name for name in present if counts[name] < MIN_VISIBLE_PIXELS)
    raise RuntimeError(f"Could not lay out a scene with {sorted(present)} (seed parts {seed_parts}) in which "
                       f"{hidden} stay visible after {_MAX_ATTEMPTS} attempts; this is a generator bug.")


def render_image(seed: int, index: int) -> tuple[Image.Image, tuple[str, ...]]:
    """Image `index` of the dataset with `seed` and its labels: render_scene(*image_spec(seed, index), ...)."""
    labels, portrait = image_spec(seed, index)
    return render_scene(labels, portrait, (seed, index)), labels


# ------------------------------------------------------------------------------------------- dataset files


def _manifest(n_train: int, n_test: int, seed: int) -> dict:
    return {"generator": "demo_dataset", "generator_version": GENERATOR_VERSION, "seed": seed,
            "n_train": n_train, "n_test": n_test, "labels": list(DEMO_LABELS),
            "image_size": {"landscape": list(LANDSCAPE_SIZE), "portrait": list(PORTRAIT_SIZE)},
            "jpeg_quality": 90, "complete": True}


def _image_name(index: int) -> str:
    return f"{index:06d}.jpeg"


def _split_indices(n_train: int, n_test: int) -> dict[str, range]:
    return {"train": range(n_train), "test": range(n_train, n_train + n_test)}


def _read_json(path: Path):
    """Parsed JSON of `path`, or None if it is missing or not valid JSON (e.g. truncated by a crash)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _atomic_write_text(path: Path, text: str) -> None:
    """utils.atomic_write_text without fsync: it guards against an interrupted process (Ctrl-C, kill), the case
    that matters for regenerable files, and an fsync per file costs seconds on a busy disk."""
    atomic_write_text(path, text, durable=False)


def _is_complete(root: Path, manifest: dict) -> bool:
    """True iff the marker matches `manifest` and both annotation files and all their images are in place."""
    if _read_json(root / MARKER_NAME) != manifest:
        return False
    for split, indices in _split_indices(manifest["n_train"], manifest["n_test"]).items():
        data = _read_json(root / f"{split}.json")
        if not isinstance(data, dict) or data.get("labels") != list(DEMO_LABELS):
            return False
        names = [s.get("image_name") if isinstance(s, dict) else None for s in data.get("samples") or []]
        if names != [_image_name(i) for i in indices]:
            return False
        if not all((root / "images" / name).is_file() for name in names):
            return False
    return True


def _check_not_foreign(root: Path) -> None:
    """Refuse to overwrite annotation files of another dataset (e.g. Corel-5k) that happen to sit in `root`."""
    if (root / MARKER_NAME).exists():
        return
    for split in ("train", "test"):
        data = _read_json(root / f"{split}.json")
        if isinstance(data, dict) and data.get("labels") != list(DEMO_LABELS):
            raise FileExistsError(f"'{root / f'{split}.json'}' belongs to another dataset (its vocabulary is not the "
                                  f"demo one); give ensure_demo_dataset an empty or demo-only folder.")


def ensure_demo_dataset(root: str | os.PathLike, n_train: int = 2000, n_test: int = 500, seed: int = 0,
                        progress: bool = True) -> Path:
    """Generate the demo dataset under `root` unless a complete one with the same parameters is there; returns root.

    Order, so that a crash never leaves a set that looks complete: the marker demo.json is first rewritten as
    incomplete, then the images (each via a temporary file + os.replace), then demo_vocabulary.txt,
    train.json and test.json (atomically), and the complete marker last. A call whose marker, annotation
    files and images all match does nothing; anything else (interrupted run, other seed / sizes / generator
    version, deleted or truncated file) regenerates.
    """
    for name, value, low in (("n_train", n_train, 1), ("n_test", n_test, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value < 2**32:
            raise ValueError(f"ensure_demo_dataset: {name} must be an integer in [{low}, 2**32), got {value!r}.")
    n_train, n_test, seed = int(n_train), int(n_test), int(seed)
    root = Path(root)
    manifest = _manifest(n_train, n_test, seed)
    if _is_complete(root, manifest):
        return root
    _check_not_foreign(root)
    ours_before = (root / MARKER_NAME).exists()
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(root / MARKER_NAME, json.dumps({**manifest, "complete": False}))

    splits = _split_indices(n_train, n_test)
    samples: dict[str, list[dict]] = {split: [] for split in splits}
    with tqdm(total=n_train + n_test, desc="Generating demo dataset", unit="img", disable=not progress) as bar:
        for split, indices in splits.items():
            for index in indices:
                image, labels = render_image(seed, index)
                name = _image_name(index)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                atomic_write_bytes(images / name, buffer.getvalue(), durable=False)
                samples[split].append({"image_name": name, "image_labels": list(labels)})
                bar.update(1)

    if ours_before:  # drop images of an earlier, larger demo set and temporary files of a crashed run
        wanted = {_image_name(i) for r in splits.values() for i in r}
        for path in images.iterdir():
            stale_temporary = path.name.startswith(".") and path.name.endswith(".tmp")  # utils' atomic-write names
            if (_IMAGE_NAME.match(path.name) and path.name not in wanted) or stale_temporary:
                path.unlink()
    _atomic_write_text(root / "demo_vocabulary.txt", "\n".join(DEMO_LABELS) + "\n")
    for split in splits:
        _atomic_write_text(root / f"{split}.json", json.dumps({"samples": samples[split], "labels": list(DEMO_LABELS)}))
    _atomic_write_text(root / MARKER_NAME, json.dumps(manifest))
    return root


def demo_statistics(root: str | os.PathLike) -> dict:
    """Per split: images, mean labels per image, label frequency f_j = #images with label j / #images."""
    root = Path(root)
    out = {}
    for split in ("train", "test"):
        data = _read_json(root / f"{split}.json")
        if not isinstance(data, dict) or "samples" not in data:
            raise FileNotFoundError(f"'{root / f'{split}.json'}' is missing or not valid JSON; "
                                    f"run ensure_demo_dataset('{root}') first.")
        vocab = data["labels"]
        index = {name: j for j, name in enumerate(vocab)}
        y = np.zeros((len(data["samples"]), len(vocab)), dtype=bool)  # (N, L)
        rows = [i for i, s in enumerate(data["samples"]) for _ in s["image_labels"]]
        cols = [index[name] for s in data["samples"] for name in s["image_labels"]]
        y[rows, cols] = True
        freq = y.mean(axis=0) if len(y) else np.zeros(len(vocab))
        out[split] = {"images": len(y), "labels_per_image": float(y.sum(axis=1).mean()) if len(y) else 0.0,
                      "label_frequency": dict(zip(vocab, freq.tolist()))}
    return out


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the demo dataset and print its statistics.")
    parser.add_argument("root")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = ensure_demo_dataset(args.root, args.n_train, args.n_test, args.seed)
    print(f"{root}: ready in {time.perf_counter() - start:.1f} s")
    stats = demo_statistics(root)["train"]
    print(f"train: {stats['images']} images, {stats['labels_per_image']:.2f} labels/image")
    for name, f in sorted(stats["label_frequency"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:10s} {f:6.3f}")


if __name__ == "__main__":
    _main()
