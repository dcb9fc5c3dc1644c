"""A learnable mini-ImageNet written as real JPEG files in ImageNet's folder layout.

``<out>/train/<wnid>/<wnid>_<k>.JPEG`` and ``<out>/val/<wnid>/<wnid>_val_<k>.JPEG``, plus
``classes.tsv`` (wnid, description). A class is a shape × colour × texture; each image puts one
instance at a random position and scale, with a jittered colour, over a noisy background
and a faint distractor, so a linear model does not saturate it but a small CNN learns it.
Every image is a pure function of (seed, split, class, index): the same arguments give the
same bytes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from knl_train.errors import UserError

SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOURS = {"red": (200, 40, 40), "blue": (40, 70, 210), "green": (40, 170, 60),
           "yellow": (220, 200, 40)}
TEXTURES = ("solid", "striped")
MAX_CLASSES = len(SHAPES) * len(COLOURS) * len(TEXTURES)
MARKER = "dataset.json"


@dataclass(frozen=True)
class DemoSpec:
    classes: int = 10
    train_per_class: int = 260
    val_per_class: int = 50
    size: int = 32
    seed: int = 0

    def validate(self):
        if not 2 <= self.classes <= MAX_CLASSES:
            raise UserError(f"--classes must be between 2 and {MAX_CLASSES} "
                            f"({len(SHAPES)} shapes x {len(COLOURS)} colours x {len(TEXTURES)} textures), "
                            f"got {self.classes}")
        for name in ("train_per_class", "val_per_class"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 16 <= self.size <= 512:
            raise UserError(f"--size must be between 16 and 512 pixels, got {self.size}")


def wnid(index: int) -> str:
    """ImageNet-style synset id for demo class ``index`` (not a real WordNet id)."""
    return f"n9{index:07d}"


def describe(index: int) -> str:
    shape = SHAPES[index % len(SHAPES)]
    colour = list(COLOURS)[(index // len(SHAPES)) % len(COLOURS)]
    texture = TEXTURES[index // (len(SHAPES) * len(COLOURS))]
    return f"{texture} {colour} {shape}"


def render(spec: DemoSpec, split: str, cls: int, k: int) -> bytes:
    """The JPEG bytes of image ``k`` of class ``cls`` in ``split``."""
    rng = np.random.default_rng([spec.seed, 0 if split == "train" else 1, cls, k])
    s = spec.size
    texture, colour_name, shape = describe(cls).split()
    base = np.full((s, s, 3), rng.uniform(70, 190), dtype=np.float64)
    base += rng.normal(0, 22, size=(s, s, 3))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)

    # A faint distractor of a random other shape, in grey, so "any blob" is not enough.
    _draw_shape(draw, SHAPES[rng.integers(len(SHAPES))], rng, s, scale=(0.15, 0.3),
                fill=tuple(int(v) for v in rng.uniform(60, 200, size=1).repeat(3)))

    colour = np.array(COLOURS[colour_name], dtype=np.float64) + rng.normal(0, 18, size=3)
    fill = tuple(int(v) for v in np.clip(colour, 0, 255))
    box = _draw_shape(draw, shape, rng, s, scale=(0.35, 0.7), fill=fill)
    if texture == "striped":
        x0, y0, x1, y1 = box
        step = max(2, s // 10)
        bg = tuple(int(v) for v in np.clip(np.array(fill) * 0.35 + 40, 0, 255))
        for x in range(int(x0), int(x1) + 1, step * 2):
            for y in range(int(y0), int(y1) + 1):
                if img.getpixel((min(x, s - 1), min(y, s - 1))) == fill:
                    draw.line([(x, y), (min(x + step - 1, s - 1), y)], fill=bg)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def _draw_shape(draw, shape, rng, s, scale, fill):
    r = rng.uniform(*scale) * s / 2
    cx, cy = rng.uniform(r, s - r, size=2)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r / 3)))
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        w = max(1, r / 3)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    return box


def is_complete(out: Path, spec: DemoSpec) -> bool:
    try:
        return json.loads((Path(out) / MARKER).read_text()) == asdict(spec)
    except (OSError, ValueError):
        return False


def make_demo(out, spec: DemoSpec, progress: bool = True) -> bool:
    """Write the dataset to ``out``; return False if an identical one is already there.

    The files go to a sibling temporary directory that is renamed into place at the end, so an
    interrupted run never leaves a half-written dataset behind ``out``.
    """
    spec.validate()
    out = Path(out)
    if is_complete(out, spec):
        return False
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / MARKER).exists():
            raise UserError(f"{out} exists and is not a knl-train demo dataset; "
                            "choose another --out or remove it")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = [(split, c, k) for split, n in (("train", spec.train_per_class), ("val", spec.val_per_class))
            for c in range(spec.classes) for k in range(n)]
    try:
        from tqdm import tqdm
        for c in range(spec.classes):
            for split in ("train", "val"):
                (tmp / split / wnid(c)).mkdir(parents=True, exist_ok=True)
        for split, c, k in tqdm(jobs, desc=f"make-demo {out.name}", unit="img", disable=not progress,
                                mininterval=1.0):
            name = f"{wnid(c)}_{k}.JPEG" if split == "train" else f"{wnid(c)}_val_{k}.JPEG"
            (tmp / split / wnid(c) / name).write_bytes(render(spec, split, c, k))
        (tmp / "classes.tsv").write_text(
            "".join(f"{wnid(c)}\t{describe(c)}\n" for c in range(spec.classes)))
        (tmp / MARKER).write_text(json.dumps(asdict(spec), indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True
