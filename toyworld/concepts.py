"""The concept family of the toy world: shapes x colours x styles, and which members are held out.

Every concept is a point of a parametric family, not an entry of a hand-written table:
- shapes are radial functions r(phi) in the shape's own frame (regular n-gons, k-pointed stars, the circle,
  a plus-shaped cross); `shape_family()` enumerates the family's members with generated names.
- colours are hues on the colour wheel (`colour_family(n)` spaces n named hues evenly).
- styles are texture functions of the shape-local coordinates (stripes, dots, checks, rings, ...).
`make_world(seed)` draws, from a seeded generator, which members the world uses and which one member of
each axis is *held out*: never rendered during pre-training and distillation, only by the evaluator's
training set and by the fine-tuning experiment.
"""
import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

# -- shapes ----------------------------------------------------------------------------------------------

_POLYGON_NAMES = {3: "triangle", 4: "square", 5: "pentagon", 6: "hexagon"}
_STAR_NAMES = {4: "sparkle", 5: "star", 6: "asterisk"}


@dataclass(frozen=True)
class Shape:
    name: str
    kind: str          # "circle" | "polygon" | "star" | "cross"
    n: int = 0         # sides (polygon) or points (star)
    depth: float = 0.0  # star: how deep the valleys between points are (0..1)


def shape_family() -> List[Shape]:
    """All shapes the renderer can draw, in a fixed order (names are derived from the parameters)."""
    fam = [Shape("circle", "circle")]
    fam += [Shape(_POLYGON_NAMES[n], "polygon", n) for n in range(3, 7)]
    fam += [Shape(_STAR_NAMES[k], "star", k, 0.5) for k in (4, 5, 6)]
    fam += [Shape("cross", "cross", 4)]
    return fam


# -- colours ---------------------------------------------------------------------------------------------

_HUE_NAMES = ["red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet",
              "purple", "magenta", "pink", "rose"]


@dataclass(frozen=True)
class Colour:
    name: str
    hue: float  # in [0, 1)


def colour_family(n: int = 10) -> List[Colour]:
    """n hues evenly around the wheel, named by the nearest of 14 reference hue names."""
    if not 2 <= n <= len(_HUE_NAMES):
        raise ValueError(f"colour family size must be in 2..{len(_HUE_NAMES)}")
    out, used = [], set()
    for i in range(n):
        hue = i / n
        # nearest reference name not yet used (reference names sit at k/14 around the wheel)
        order = sorted(range(len(_HUE_NAMES)), key=lambda k: min(abs(k / len(_HUE_NAMES) - hue),
                                                                 1 - abs(k / len(_HUE_NAMES) - hue)))
        name = next(_HUE_NAMES[k] for k in order if _HUE_NAMES[k] not in used)
        used.add(name)
        out.append(Colour(name, hue))
    return out


# -- styles ----------------------------------------------------------------------------------------------

STYLE_NAMES = ["solid", "striped", "dotted", "checkered", "gradient", "outlined", "ringed", "banded"]


@dataclass(frozen=True)
class Style:
    name: str


def style_family() -> List[Style]:
    return [Style(n) for n in STYLE_NAMES]


# -- the world -------------------------------------------------------------------------------------------

TRIGGER_WORDS = ("sks", "zqv", "bnx", "tlw")  # reserved tokens; never in a pre-training caption


@dataclass(frozen=True)
class Variety:
    """How much the images of one caption differ (pose and scene); the renderer draws within these ranges.

    The wider the variety, the further the mean of a caption's images is from any one of them, so a sampler that
    averages (a multi-step model run with few steps, or SFT's regression) visibly blurs. Version 1 of the world
    (issue 6) used jitter 1, radius 0.30-0.36, angle 0.2 and no scene, where that mean stayed nearly sharp.
    """
    centres: Tuple[Tuple[float, float], ...] = ((-5.0, -5.0), (5.0, -5.0), (-5.0, 5.0), (5.0, 5.0))  # places, px
    jitter: float = 1.0                # centre offset range around the drawn place, +- pixels
    radius: Tuple[float, float] = (0.24, 0.30)   # circumradius range, fraction of the image size
    angle: float = 0.2                 # rotation range, +- radians
    scene: float = 1.0                 # background: 0 flat dark grey; 1 a dark tint of random hue with a gradient


VARIETY_V1 = Variety(centres=((0.0, 0.0),), jitter=1.0, radius=(0.30, 0.36), angle=0.2, scene=0.0)  # issue 6's world


@dataclass
class World:
    """The members of each axis this world uses, and the held-out member of each axis."""
    seed: int
    shapes: List[Shape]
    colours: List[Colour]
    styles: List[Style]
    held_out: Dict[str, str] = field(default_factory=dict)  # axis -> held-out member name
    variety: Variety = field(default_factory=Variety)

    AXES = ("shape", "colour", "style")

    def members(self, axis: str) -> list:
        return {"shape": self.shapes, "colour": self.colours, "style": self.styles}[axis]

    def names(self, axis: str) -> List[str]:
        return [m.name for m in self.members(axis)]

    def train_names(self, axis: str) -> List[str]:
        return [n for n in self.names(axis) if n != self.held_out[axis]]

    def index(self, axis: str, name: str) -> int:
        return self.names(axis).index(name)

    def lookup(self, axis: str, name: str):
        return self.members(axis)[self.index(axis, name)]

    def is_seen(self, shape: str, colour: str, style: str) -> bool:
        """True for a combination pre-training may use: no attribute is a held-out member."""
        return (shape != self.held_out["shape"] and colour != self.held_out["colour"]
                and style != self.held_out["style"])

    def vocabulary(self) -> List[str]:
        words = ["a"] + self.names("colour") + self.names("style") + self.names("shape")
        return words + list(TRIGGER_WORDS)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "shapes": [asdict(s) for s in self.shapes],
                "colours": [asdict(c) for c in self.colours], "styles": [asdict(s) for s in self.styles],
                "held_out": dict(self.held_out), "variety": asdict(self.variety)}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def make_world(seed: int = 0, n_shapes: int = 7, n_colours: int = 10, n_styles: int = 6,
               held_out: Optional[Dict[str, str]] = None, variety: Optional[Variety] = None) -> World:
    """Draw a world from the concept family with a seeded generator.

    n_* members per axis are drawn (the circle and the square are always in, so every world has the two
    simplest shapes); one member of each axis is held out, chosen by the seed unless `held_out` names it.
    The solid style is never held out (it is the untextured base every other style modulates).
    """
    rng = random.Random(seed)
    fam_shapes = shape_family()
    base = [s for s in fam_shapes if s.name in ("circle", "square")]
    rest = [s for s in fam_shapes if s.name not in ("circle", "square")]
    shapes = base + rng.sample(rest, n_shapes - len(base))
    shapes.sort(key=lambda s: fam_shapes.index(s))
    colours = colour_family(n_colours)
    fam_styles = style_family()
    styles = [fam_styles[0]] + rng.sample(fam_styles[1:], n_styles - 1)
    styles.sort(key=lambda s: fam_styles.index(s))
    ho = dict(held_out or {})
    ho.setdefault("shape", rng.choice([s.name for s in shapes if s.name not in ("circle", "square")]))
    ho.setdefault("colour", rng.choice([c.name for c in colours]))
    ho.setdefault("style", rng.choice([s.name for s in styles if s.name != "solid"]))
    world = World(seed, shapes, colours, styles, ho, variety or Variety())
    for axis in World.AXES:
        if ho[axis] not in world.names(axis):
            raise ValueError(f"held-out {axis} {ho[axis]!r} is not a member of this world: {world.names(axis)}")
    return world


def caption(colour: str, style: str, shape: str) -> str:
    return f"a {colour} {style} {shape}"


def parse_caption(text: str) -> Tuple[str, str, str]:
    words = text.split()
    if len(words) != 4 or words[0] != "a":
        raise ValueError(f"not a toy-world caption: {text!r}")
    return words[1], words[2], words[3]


def all_combinations(world: World, seen_only: bool = True) -> List[Tuple[str, str, str]]:
    """(shape, colour, style) triples of the world; seen_only drops every triple with a held-out member."""
    out = []
    for sh in world.names("shape"):
        for co in world.names("colour"):
            for st in world.names("style"):
                if not seen_only or world.is_seen(sh, co, st):
                    out.append((sh, co, st))
    return out
