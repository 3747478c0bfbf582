"""Vectorised procedural renderer: (shape, colour, style, pose) -> RGB image in [-1, 1].

All randomness comes in through `sample_pose` (a torch.Generator), so a render is a pure function of its
arguments. Coordinates are in pixels, measured from the image centre; the shape frame is rotated by the
pose angle and scaled by the shape's circumradius.
"""
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .concepts import Colour, Shape, Style, Variety

IMAGE_SIZE = 32
BACKGROUND = (0.08, 0.08, 0.10)


@dataclass
class Pose:
    """Per-image nuisance parameters, each a tensor [B] (background [B, 3])."""
    cx: torch.Tensor       # centre, pixels from the image centre
    cy: torch.Tensor
    radius: torch.Tensor   # circumradius, pixels
    angle: torch.Tensor    # radians
    phase: torch.Tensor    # texture phase in [0, 1)
    hue_jitter: torch.Tensor
    sat: torch.Tensor
    val: torch.Tensor
    background: torch.Tensor   # [B, 3] RGB in [0, 1] at the image centre
    slope: torch.Tensor        # background gradient across the image, RGB units
    slope_angle: torch.Tensor  # its direction, radians


def sample_pose(n: int, generator: torch.Generator, variety: Variety = Variety(), size: int = IMAGE_SIZE) -> Pose:
    """Centre, size and angle within `variety`'s ranges, texture phase uniform, small hue/saturation jitter; with
    `variety.scene`, a dark background of random hue, saturation and brightness with a linear gradient.

    The texture phase is always free: the mean of a striped shape over phases is a flat shape. The wider ranges
    of world version 2 make the mean of a caption's images a faint blur (see concepts.Variety).
    """
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=generator)  # noqa: E731
    radius = u(*variety.radius) * size
    pose = Pose(cx=u(-variety.jitter, variety.jitter), cy=u(-variety.jitter, variety.jitter),
                radius=radius, angle=u(-variety.angle, variety.angle), phase=torch.rand(n, generator=generator),
                hue_jitter=u(-0.015, 0.015), sat=u(0.75, 1.0), val=u(0.8, 1.0),
                background=torch.tensor(BACKGROUND).expand(n, 3).clone(), slope=torch.zeros(n),
                slope_angle=torch.zeros(n))
    if len(variety.centres) > 1:   # a discrete choice of place: the modes a few big sampler steps average over
        which = torch.randint(len(variety.centres), (n,), generator=generator)
        offsets = torch.tensor(variety.centres, dtype=torch.float32)[which]
        pose.cx, pose.cy = pose.cx + offsets[:, 0], pose.cy + offsets[:, 1]
    if variety.scene:
        k = variety.scene   # draws happen only with a scene, so version 1 renders stay bit-identical
        tint = _hsv_to_rgb(torch.rand(n, generator=generator), u(0.0, 0.6), u(0.06, 0.26))
        pose.background = (1 - k) * pose.background + k * tint
        pose.slope = k * u(0.0, 0.2)
        pose.slope_angle = u(-math.pi, math.pi)
    return pose


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B] each -> [B, 3]."""
    h = (h % 1.0) * 6.0
    k = torch.stack([(5 + h) % 6, (3 + h) % 6, (1 + h) % 6], dim=1)
    f = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v[:, None] - v[:, None] * s[:, None] * f


def _radial_limit(shape: Shape, phi: torch.Tensor) -> torch.Tensor:
    """Boundary radius (circumradius 1) of a star-shaped outline at angle phi (0 = pointing up)."""
    if shape.kind == "circle":
        return torch.ones_like(phi)
    if shape.kind == "polygon":
        seg = 2 * math.pi / shape.n
        a = torch.remainder(phi + (seg / 2 if shape.n % 2 == 0 else 0.0), seg) - seg / 2
        return math.cos(math.pi / shape.n) / torch.cos(a)
    if shape.kind == "star":
        f = torch.remainder(phi * shape.n / (2 * math.pi), 1.0)
        valley = 2 * torch.minimum(f, 1 - f)  # 0 at a point, 1 between points
        return 1.0 - shape.depth * valley
    raise ValueError(f"no radial form for shape kind {shape.kind!r}")


def _edge_distance(shape: Shape, lx: torch.Tensor, ly: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance to the outline in pixels, positive inside."""
    if shape.kind == "cross":
        arm = 0.36
        ax, ay = lx.abs(), ly.abs()
        d1 = torch.minimum(arm - ax, 1 - ay)  # vertical bar
        d2 = torch.minimum(1 - ax, arm - ay)  # horizontal bar
        return torch.maximum(d1, d2) * radius
    rho = torch.sqrt(lx ** 2 + ly ** 2)
    phi = torch.atan2(lx, -ly)  # 0 = up in image coordinates (y grows downwards)
    return (_radial_limit(shape, phi) - rho) * radius


def _style_pattern(style: Style, px: torch.Tensor, py: torch.Tensor, edge: torch.Tensor,
                   phase: torch.Tensor):
    """Texture in pixel coordinates of the shape frame -> (t in [0,1]: 1 = main colour, alpha multiplier)."""
    sm = lambda z: torch.clamp(z * 1.5 + 0.5, 0.0, 1.0)  # noqa: E731  soft threshold of a zero-mean signal
    two_pi = 2 * math.pi
    ones = torch.ones_like(px)
    name = style.name
    if name == "solid":
        return ones, ones
    if name == "striped":     # horizontal stripes, period 5 px
        return sm(torch.sin(two_pi * (py / 5.0 + phase))), ones
    if name == "banded":      # diagonal bands, period 7 px
        return sm(torch.sin(two_pi * ((px + py) / 7.0 + phase))), ones
    if name == "checkered":   # 4 px checks
        cx = torch.sin(two_pi * (px / 8.0 + phase))
        cy = torch.sin(two_pi * (py / 8.0 + phase))
        return sm(cx * cy * 2.0), ones
    if name == "dotted":      # pale field with main-colour dots on a 6 px grid
        gx = torch.remainder(px + 6.0 * phase, 6.0) - 3.0
        gy = torch.remainder(py + 6.0 * phase, 6.0) - 3.0
        return sm(1.9 - torch.sqrt(gx ** 2 + gy ** 2)), ones
    if name == "ringed":      # concentric rings, period 5 px
        rho = torch.sqrt(px ** 2 + py ** 2)
        return sm(torch.sin(two_pi * (rho / 5.0 - phase))), ones
    if name == "gradient":    # dark at the top to bright at the bottom, carried by alpha of the main colour
        t = torch.clamp(0.5 + py / 20.0, 0.0, 1.0)
        return ones, 0.25 + 0.75 * t
    if name == "outlined":    # a 2.5 px border, hollow inside
        return ones, torch.clamp(3.0 - edge, 0.0, 1.0)
    raise ValueError(f"unknown style {name!r}")


def render(shapes: Sequence[Shape], colours: Sequence[Colour], styles: Sequence[Style], pose: Pose,
           size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render B images -> [B, 3, size, size] in [-1, 1]; shapes/colours/styles are length-B sequences."""
    n = len(shapes)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5 - size / 2,
                            torch.arange(size, dtype=torch.float32) + 0.5 - size / 2, indexing="ij")
    out = torch.empty(n, 3, size, size)
    hue = torch.tensor([c.hue for c in colours]) + pose.hue_jitter
    main = _hsv_to_rgb(hue, pose.sat, pose.val)                      # [B, 3]
    pale = 0.35 * main + 0.65 * torch.ones_like(main)                 # pale tint of the same hue
    # group by (shape, style) so each group is one vectorised call
    groups = {}
    for i, (sh, st) in enumerate(zip(shapes, styles)):
        groups.setdefault((sh, st), []).append(i)
    for (sh, st), idx in groups.items():
        ii = torch.tensor(idx)
        dx = xs[None] - pose.cx[ii, None, None]
        dy = ys[None] - pose.cy[ii, None, None]
        ca, sa = torch.cos(pose.angle[ii])[:, None, None], torch.sin(pose.angle[ii])[:, None, None]
        px, py = ca * dx + sa * dy, -sa * dx + ca * dy             # shape frame, pixels
        r = pose.radius[ii, None, None]
        edge = _edge_distance(sh, px / r, py / r, r)
        mask = torch.clamp(edge + 0.5, 0.0, 1.0)                    # anti-aliased coverage
        t, alpha = _style_pattern(st, px, py, edge, pose.phase[ii, None, None])
        fg = t[:, None] * main[ii, :, None, None] + (1 - t[:, None]) * pale[ii, :, None, None]
        a = (mask * alpha)[:, None]
        ramp = (torch.cos(pose.slope_angle[ii])[:, None, None] * xs[None]
                + torch.sin(pose.slope_angle[ii])[:, None, None] * ys[None]) / size   # -0.7..0.7 across
        bg = (pose.background[ii, :, None, None] + (pose.slope[ii, None, None] * ramp)[:, None]).clamp(0, 1)
        img = a * fg + (1 - a) * bg
        out[ii] = img
    return out * 2.0 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 [B, H, W, 3]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, scale: int = 3, pad: int = 2):
    """Write a PNG grid of [-1, 1] images (nearest-neighbour upscaled) with pillow."""
    from PIL import Image
    imgs = to_uint8(images).numpy()
    b, h, w, _ = imgs.shape
    ncol = min(nrow, b)
    nrows = (b + ncol - 1) // ncol
    canvas = Image.new("RGB", (ncol * (w * scale + pad) + pad, nrows * (h * scale + pad) + pad), (255, 255, 255))
    for i in range(b):
        tile = Image.fromarray(imgs[i]).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (pad + (i % ncol) * (w * scale + pad), pad + (i // ncol) * (h * scale + pad)))
    canvas.save(path)
