"""Input-transformation defenses: each takes an 8-bit HxWx3 RGB array and returns one, as a deployed service would
apply it to the file it received. Randomized ones draw from a NumPy Generator, so a seed makes them repeatable.

- jpeg: re-compression at `quality` (the tutorial's defense; Dziugaite et al. 2016, Guo et al. 2018), PIL.
- bits: bit-depth reduction to `bits` per channel (Xu, Evans and Qi 2018, "Feature Squeezing"), PIL posterize.
- median: median filter of odd `size` (Xu et al. 2018), OpenCV.
- blur: Gaussian blur of `sigma` pixels, OpenCV.
- resize: down by `scale`, then back up (Guo et al. 2018 use such rescaling), PIL bilinear.
- random: per call a random down-and-up resize and a random JPEG quality (in the spirit of Xie et al. 2018 and
  Guo et al. 2018), from the generator.
"""
import io

import cv2
import numpy as np
from PIL import Image, ImageOps

from utils.cli import UsageError

RANDOM_QUALITIES = (50, 90)
RANDOM_SCALES = (0.6, 1.0)


def jpeg_bytes(image, quality=75):
    """The JPEG file a service would store, at `quality` (1..100, PIL's default 4:2:0 chroma subsampling)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()


def jpeg(image, quality=75):
    with Image.open(io.BytesIO(jpeg_bytes(image, quality))) as decoded:
        return np.asarray(decoded.convert("RGB")).copy()


def bits(image, bits=3):
    return np.asarray(ImageOps.posterize(Image.fromarray(image), int(bits))).copy()


def median(image, size=3):
    return cv2.medianBlur(np.ascontiguousarray(image), int(size))


def blur(image, sigma=1.0):
    return cv2.GaussianBlur(np.ascontiguousarray(image), (0, 0), float(sigma), borderType=cv2.BORDER_REFLECT_101)


def resize(image, scale=0.5):
    height, width = image.shape[:2]
    small = (max(1, round(width * scale)), max(1, round(height * scale)))
    down = Image.fromarray(image).resize(small, Image.Resampling.BILINEAR)
    return np.asarray(down.resize((width, height), Image.Resampling.BILINEAR)).copy()


def random(image, rng):
    """A random rescale in RANDOM_SCALES, then JPEG at a random quality in RANDOM_QUALITIES."""
    scale = rng.uniform(*RANDOM_SCALES)
    quality = int(rng.integers(RANDOM_QUALITIES[0], RANDOM_QUALITIES[1] + 1))
    return jpeg(resize(image, scale), quality)


# name -> (function, {parameter: (default, check, description)})
DEFENSES = {
    "jpeg": (jpeg, {"quality": (75, lambda q: q == int(q) and 1 <= q <= 100, "an integer in 1..100")}),
    "bits": (bits, {"bits": (3, lambda b: b == int(b) and 1 <= b <= 8, "an integer in 1..8")}),
    "median": (median, {"size": (3, lambda s: s == int(s) and s % 2 == 1 and 3 <= s <= 15, "an odd integer in 3..15")}),
    "blur": (blur, {"sigma": (1.0, lambda s: 0 < s <= 10, "in (0, 10]")}),
    "resize": (resize, {"scale": (0.5, lambda s: 0 < s <= 1, "in (0, 1]")}),
    "random": (random, {}),
}


def defense_parameters(name, given):
    """The defense's parameters: those it takes from `given` (None means its default), each checked."""
    if name not in DEFENSES:
        raise UsageError(f"unknown defense {name!r}; choose from {', '.join(DEFENSES)}")
    chosen = {}
    for parameter, (default, check, description) in DEFENSES[name][1].items():
        value = given.get(parameter)
        value = default if value is None else value
        if not check(value):
            raise UsageError(f"`{parameter}` for the {name} defense must be {description}, got {value:g}", parameter)
        chosen[parameter] = value
    return chosen


def make_defense(name, seed=0, **given):
    """The defense `name` as a function of one 8-bit image, with checked parameters; random ones seeded."""
    function, _ = DEFENSES.get(name, (None, None))
    parameters = defense_parameters(name, given)
    if name == "random":
        rng = np.random.default_rng(seed)
        return lambda image: random(image, rng)
    return lambda image: function(image, **parameters)


def describe(name, **given):
    parameters = defense_parameters(name, given)
    inside = ", ".join(f"{key} {value:g}" for key, value in parameters.items())
    return f"{name} ({inside})" if inside else name
