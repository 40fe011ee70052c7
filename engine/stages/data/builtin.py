"""The built-in benchmark: a procedural, Waterbirds-style world that ships as code.

Class = object family (landbird, waterbird), attribute = background family (land, water).
Each class has three visible sub-types (shape and colour) and each attribute two background
sub-types, so clustering has structure to find. Two styles share the vocabulary:

- ``benchmark``: shaded objects on textured backgrounds with rendering noise; the dataset
  the classifier is trained and evaluated on. How hard its object (the core feature) is to
  see, beside the background (the shortcut), is a named ``Rendering`` (``RENDERINGS``;
  ``data.builtin.rendering``): object size, placement, colour and noise.
- ``photo`` and ``base``: the captioned corpus the tiny generator is pretrained on, as Stable
  Diffusion is pretrained on web images, never on the benchmark. ``photo`` draws shaded
  objects in any of the six colours at any size on textures of its own, with any amount of
  noise; ``base`` draws flat colours with a dark outline on plain backgrounds (captioned as
  drawings). Both share the world's shapes and colour tables with the benchmark (the six
  objects' silhouettes and colours, each background family's colours), in every
  (object, background) pair alike, as Stable Diffusion has seen birds and water; neither
  uses the benchmark's renderer, its shared palette, jitter, noise or sizes, so fine-tuning
  has a domain gap to close, while the generator's VAE can still represent benchmark images.

Every image is a pure function of (object, background, seed, style, size, rendering).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASS_NAMES = ("landbird", "waterbird")
ATTRIBUTE_NAMES = ("land", "water")
# Sub-types per class: the visible shape tells the class (tall vs wide), colour the sub-type.
OBJECT_SUBTYPES = {
    0: ("sparrow", "crow", "finch"),
    1: ("duck", "gull", "heron"),
}
BACKGROUND_SUBTYPES = {
    0: ("forest", "desert"),
    1: ("ocean", "lake"),
}
OBJECTS = tuple(name for c in sorted(OBJECT_SUBTYPES) for name in OBJECT_SUBTYPES[c])
BACKGROUNDS = tuple(name for a in sorted(BACKGROUND_SUBTYPES) for name in BACKGROUND_SUBTYPES[a])
OBJECT_CLASS = {name: c for c, names in OBJECT_SUBTYPES.items() for name in names}
BACKGROUND_ATTRIBUTE = {name: a for a, names in BACKGROUND_SUBTYPES.items() for name in names}
STYLES = ("benchmark", "photo", "base")
# A dataset record's image address: builtin://<object>/<background>/<seed>[/<rendering>].
BUILTIN_SCHEME = "builtin://"


@dataclass(frozen=True)
class Rendering:
    """How the benchmark style draws its object; each (low, high) range is drawn per image.

    The background (the shortcut) fills most of the image in every rendering; these knobs
    make the object (the core feature) smaller, noisier, and, with a shared palette, readable
    by its shape alone, so a classifier learns it later than the background, as on Waterbirds."""

    scale: tuple[float, float] = (0.24, 0.32)  # object radius, as a share of the image side
    centre: tuple[float, float] = (0.38, 0.62)  # object centre, as a share of the side
    angle: float = 0.25  # largest rotation (radians)
    colour_jitter: float = 20.0  # per-image shift of each object colour channel
    noise: float = 8.0  # std of per-pixel Gaussian noise
    # Waterbirds wear their partner landbird's colour (PALETTE_PARTNER): colour then tells the
    # sub-type within a class, so clustering keeps its structure, but not the class.
    shared_palette: bool = False


RENDERINGS = {
    # The benchmark as first shipped: large objects whose colour alone names their class. On
    # it ERM and Group-DRO both reached 1.0 worst-group accuracy at severity 0.95.
    "classic": Rendering(),
    # The default (data.builtin.rendering): calibrated by benchmarks/research/benchmark_calibration.py
    # so ERM and Group-DRO land where they do on Waterbirds; only shape tells the class, on
    # smaller, noisier objects.
    "calibrated": Rendering(scale=(0.18, 0.28), colour_jitter=25.0, noise=14.0, shared_palette=True),
}
# The rendering of a builtin:// address that names none, and of render() when it is not told.
UNNAMED_RENDERING = "classic"

_OBJECT_COLOUR = {
    "sparrow": (150, 95, 50),
    "crow": (35, 35, 40),
    "finch": (235, 205, 40),
    "duck": (225, 115, 30),
    "gull": (240, 240, 240),
    "heron": (150, 120, 185),
}
_BACKGROUND_COLOURS = {  # (base colour, texture colour)
    "forest": ((40, 110, 45), (20, 65, 25)),
    "desert": ((215, 185, 120), (180, 145, 85)),
    "ocean": ((25, 60, 150), (90, 140, 215)),
    "lake": ((95, 175, 190), (160, 215, 225)),
}


# Each waterbird sub-type's landbird partner, whose colour it wears under a shared palette.
PALETTE_PARTNER = {"duck": "sparrow", "gull": "crow", "heron": "finch"}


def caption(object_name: str, background_name: str) -> str:
    """The caption the base corpus pairs with an image, and the prompt that asks for one."""
    return f"a photo of a {object_name} on {background_name}"


def _object_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape in local coordinates (u right, v down, roughly [-1, 1]); tall for landbirds,
    wide for waterbirds."""
    if name == "sparrow":
        return (u / 0.6) ** 2 + v**2 <= 1.0
    if name == "crow":
        return (v >= -1.0) & (v <= 1.0) & (np.abs(u) <= (v + 1.0) * 0.45)
    if name == "finch":
        return np.abs(u) / 0.65 + np.abs(v) <= 1.0
    if name == "duck":
        return u**2 + (v / 0.55) ** 2 <= 1.0
    if name == "gull":
        return (u**2 + ((v - 0.45) / 1.1) ** 2 <= 1.0) & (v <= 0.45)
    if name == "heron":
        body = (np.abs(u) <= 1.0) & (np.abs(v - 0.2) <= 0.35)
        head = (np.abs(u - 0.75) <= 0.22) & (v >= -0.85) & (v <= -0.1)
        return body | head
    raise ValueError(f"unknown object {name!r}; known: {', '.join(OBJECTS)}")


def _background(name: str, style: str, rng: np.random.Generator, size: int) -> np.ndarray:
    base, texture = (np.array(c, dtype=np.float32) for c in _BACKGROUND_COLOURS[name])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if style == "base":
        # Plain: the base colour with one flat band of the texture colour.
        img = np.broadcast_to(base, (size, size, 3)).copy()
        band = (yy > 0.78) if name in ("forest", "desert") else (np.abs(yy - 0.3) < 0.04)
        img[band] = texture
        return img
    jitter = rng.uniform(-18, 18, size=3).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if name == "forest":  # vertical trunks
        t = (np.sin(xx * 2 * np.pi * rng.uniform(4, 6) + phase) > 0.55).astype(np.float32)
    elif name == "desert":  # low dunes
        t = 0.5 + 0.5 * np.sin(yy * 2 * np.pi * 2.5 + np.sin(xx * 6 + phase) * 1.5)
    elif name == "ocean":  # wavy horizontal crests
        t = (np.sin(yy * 2 * np.pi * 6 + np.sin(xx * 2 * np.pi * 2 + phase) * 1.2) > 0.6)
        t = t.astype(np.float32)
    else:  # lake: calm water under a pale sky
        t = (yy < rng.uniform(0.2, 0.35)).astype(np.float32) + 0.15 * np.sin(xx * 20 + phase)
    t = np.clip(t, 0.0, 1.0)[..., None]
    return base + jitter + t * (texture - base)


def _photo_background(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """The base corpus's photo backgrounds: each family's colours, shifted per image, under
    textures of their own (not the benchmark's) and a soft light gradient."""
    shift = rng.uniform(-30, 30, size=3).astype(np.float32)
    base, texture = (np.array(c, dtype=np.float32) + shift for c in _BACKGROUND_COLOURS[name])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase = rng.uniform(0, 2 * np.pi, size=2)
    if name == "forest":  # trunks of uneven width and spacing
        wobble = 0.6 * np.sin(xx * 2 * np.pi * rng.uniform(1, 3) + phase[1])
        t = 0.5 + 0.5 * np.sin(xx * 2 * np.pi * rng.uniform(2.5, 8.0) + phase[0] + wobble)
        t = (t > rng.uniform(0.3, 0.8)).astype(np.float32)
    elif name == "desert":  # dunes
        bend = rng.uniform(0.5, 3.0) * np.sin(xx * rng.uniform(3, 9) + phase[0])
        t = 0.5 + 0.5 * np.sin(yy * 2 * np.pi * rng.uniform(1.0, 4.0) + bend)
    elif name == "ocean":  # crests
        bend = rng.uniform(0.5, 2.0) * np.sin(xx * 2 * np.pi * rng.uniform(1, 3) + phase[0])
        t = (np.sin(yy * 2 * np.pi * rng.uniform(3.0, 9.0) + bend) > rng.uniform(0.3, 0.8)).astype(np.float32)
    else:  # lake: a sky band over ripples
        horizon = rng.uniform(0.1, 0.45)
        ripples = rng.uniform(0.05, 0.3) * np.sin(xx * rng.uniform(10, 30) + phase[0])
        t = (yy < horizon).astype(np.float32) + ripples * (yy >= horizon)
    t = np.clip(t, 0.0, 1.0)[..., None]
    light = 1.0 + rng.uniform(-0.15, 0.15) * (yy - 0.5) + rng.uniform(-0.15, 0.15) * (xx - 0.5)
    return (base + t * (texture - base)) * light[..., None]


# The photo style's object colour is the object's own this often, else any of the six.
PHOTO_OWN_COLOUR = 0.3


def _render_photo(object_name: str, background_name: str, seed: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = _photo_background(background_name, rng, size)
    cx, cy = rng.uniform(0.3, 0.7, size=2) * size
    scale = rng.uniform(0.15, 0.34) * size
    angle = rng.uniform(-0.4, 0.4)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = (xx - cx) / scale, (yy - cy) / scale
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = -np.sin(angle) * dx + np.cos(angle) * dy
    mask = _object_mask(object_name, u, v)
    worn = object_name if rng.random() < PHOTO_OWN_COLOUR else OBJECTS[rng.integers(len(OBJECTS))]
    colour = np.array(_OBJECT_COLOUR[worn], dtype=np.float32) + rng.uniform(-30, 30, size=3)
    shade = (1.0 - rng.uniform(0.0, 0.3) * np.clip(v, -1, 1))[..., None]
    img = np.where(mask[..., None], colour * shade, img)
    img = img + rng.normal(0.0, rng.uniform(0.0, 18.0), size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def get_rendering(name: str | Rendering) -> Rendering:
    if isinstance(name, Rendering):
        return name
    if name not in RENDERINGS:
        raise ValueError(f"unknown rendering {name!r}; known: {', '.join(RENDERINGS)}")
    return RENDERINGS[name]


def source_address(object_name: str, background_name: str, seed: int, rendering: str) -> str:
    """A record's image address; 'classic' keeps the original form, so every address written
    before renderings existed still names the image it named."""
    tail = "" if rendering == UNNAMED_RENDERING else f"/{rendering}"
    return f"{BUILTIN_SCHEME}{object_name}/{background_name}/{seed}{tail}"


def render_address(address: str, size: int) -> np.ndarray:
    """The benchmark-style image a ``source_address`` names."""
    parts = address[len(BUILTIN_SCHEME):].split("/")
    obj, bg, seed = parts[:3]
    rendering = parts[3] if len(parts) > 3 else UNNAMED_RENDERING
    return render(obj, bg, int(seed), "benchmark", size, rendering)


def render(
    object_name: str,
    background_name: str,
    seed: int,
    style: str = "benchmark",
    size: int = 32,
    rendering: str | Rendering = UNNAMED_RENDERING,
) -> np.ndarray:
    """Draw one image as uint8 [size, size, 3]."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    if background_name not in _BACKGROUND_COLOURS:
        raise ValueError(f"unknown background {background_name!r}; known: {', '.join(BACKGROUNDS)}")
    if style == "photo":
        return _render_photo(object_name, background_name, seed, size)
    # The base corpus's drawings are drawn one way whatever the benchmark's rendering.
    r = get_rendering(rendering) if style == "benchmark" else RENDERINGS[UNNAMED_RENDERING]
    rng = np.random.default_rng(seed)
    img = _background(background_name, style, rng, size)

    # Object placement: centre, scale and a small rotation, all from the seed.
    cx, cy = rng.uniform(*r.centre, size=2) * size
    scale = rng.uniform(*r.scale) * size
    angle = rng.uniform(-r.angle, r.angle)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = (xx - cx) / scale, (yy - cy) / scale
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = -np.sin(angle) * dx + np.cos(angle) * dy
    mask = _object_mask(object_name, u, v)
    worn = PALETTE_PARTNER.get(object_name, object_name) if r.shared_palette else object_name
    colour = np.array(_OBJECT_COLOUR[worn], dtype=np.float32)
    if style == "base":
        img[mask] = colour
        # A dark outline: mask pixels with a non-mask 4-neighbour.
        padded = np.pad(mask, 1)
        interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        img[mask & ~interior] = (15, 15, 15)
    else:
        colour = colour + rng.uniform(-r.colour_jitter, r.colour_jitter, size=3).astype(np.float32)
        shade = (1.0 - 0.18 * np.clip(v, -1, 1))[..., None]  # lit from above
        img = np.where(mask[..., None], colour * shade, img)
        img = img + rng.normal(0.0, r.noise, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def read_background_attribute(image: np.ndarray) -> int:
    """The background family (0 land, 1 water) an image's border shows, from colour alone:
    water is clearly bluer than red (ocean, lake), land is not (forest, desert). For judging
    generated images of this world, e.g. whether a minority unit drew its own background."""
    border = np.concatenate([image[:3].reshape(-1, 3), image[-3:].reshape(-1, 3),
                             image[:, :3].reshape(-1, 3), image[:, -3:].reshape(-1, 3)]).astype(np.float32)
    red, _, blue = border.mean(axis=0)
    return int(blue - red > 40.0)


@dataclass(frozen=True)
class BaseCorpus:
    """Captioned photos and drawings, for pretraining the tiny generator."""

    images: np.ndarray  # uint8 [n, size, size, 3]
    captions: list[str]
    object_index: np.ndarray  # index into OBJECTS
    background_index: np.ndarray  # index into BACKGROUNDS


# How often a base-corpus caption names the object by its sub-type, its class word or "bird",
# and the background by its sub-type, its attribute word or not at all. The class and
# attribute words are those of the engine's prompts ("a photo of a waterbird on land"), so the
# tiny generator learns them as Stable Diffusion knows its words, and can draw a pair it
# never saw together in the benchmark's training set.
OBJECT_WORD_SHARES = (0.45, 0.4, 0.15)
BACKGROUND_WORD_SHARES = (0.45, 0.45, 0.1)


def true_words(object_name: str, background_name: str) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
    """Every word that truly names the object, and the background (None: left unsaid), in the
    order of OBJECT_WORD_SHARES and BACKGROUND_WORD_SHARES."""
    return ((object_name, CLASS_NAMES[OBJECT_CLASS[object_name]], "bird"),
            (background_name, ATTRIBUTE_NAMES[BACKGROUND_ATTRIBUTE[background_name]], None))


def varied_caption(object_name: str, background_name: str, rng: np.random.Generator) -> str:
    """A true caption of a base-corpus image in words drawn at the shares above."""
    object_words, background_words = true_words(object_name, background_name)
    what = object_words[rng.choice(len(object_words), p=OBJECT_WORD_SHARES)]
    where = background_words[rng.choice(len(background_words), p=BACKGROUND_WORD_SHARES)]
    return caption(what, where) if where else f"a photo of a {what}"


# The base corpus's share of photos; the rest are drawings.
PHOTO_SHARE = 0.8


def base_corpus(n: int, seed: int, size: int = 32, photo_share: float = PHOTO_SHARE) -> BaseCorpus:
    """n images covering every (object, background) pair uniformly, ``photo_share`` of them
    photos and the rest drawings (the ``base`` style), with varied true captions
    (:func:`varied_caption`; a drawing's says "a drawing of a ...")."""
    rng = np.random.default_rng(seed)
    obj = rng.integers(0, len(OBJECTS), size=n)
    bg = rng.integers(0, len(BACKGROUNDS), size=n)
    seeds = rng.integers(0, 2**31 - 1, size=n)
    photo = rng.random(n) < photo_share
    styles = ["photo" if p else "base" for p in photo]
    images = np.stack(
        [render(OBJECTS[o], BACKGROUNDS[b], int(s), style, size) for o, b, s, style in zip(obj, bg, seeds, styles)]
    ) if n else np.zeros((0, size, size, 3), np.uint8)
    captions = [varied_caption(OBJECTS[o], BACKGROUNDS[b], rng) for o, b in zip(obj, bg)]
    captions = [c if p else c.replace("a photo of", "a drawing of", 1) for c, p in zip(captions, photo)]
    return BaseCorpus(images, captions, obj, bg)
