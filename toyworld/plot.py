"""Learning-curve PNGs drawn with pillow only (no plotting dependency for users)."""
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def _nice_ticks(lo: float, hi: float, n: int = 5) -> List[float]:
    if hi <= lo:
        hi = lo + 1.0
    for step in (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000):
        if (hi - lo) / step <= n + 1:
            break
    start = step * int(lo / step)
    ticks, t = [], start
    while t <= hi + 1e-9:
        if t >= lo - 1e-9:
            ticks.append(round(t, 6))
        t += step
    return ticks


def _panel(draw: ImageDraw.ImageDraw, box: Tuple[int, int, int, int], title: str,
           series: Dict[str, Sequence[Tuple[float, float]]], colours: Dict[str, tuple],
           hlines: Dict[str, float], y_range: Optional[Tuple[float, float]], font):
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 52, x1 - 10, y0 + 26, y1 - 34
    draw.text((x0 + 52, y0 + 4), title, fill=(0, 0, 0), font=font)
    xs = [p[0] for s in series.values() for p in s] or [0, 1]
    ys = [p[1] for s in series.values() for p in s] + list(hlines.values())
    xmin, xmax = min(xs), max(xs)
    ymin, ymax = y_range if y_range else (min(ys), max(ys))
    if ymax - ymin < 1e-9:
        ymax = ymin + 1.0
    pad = 0.05 * (ymax - ymin)
    ymin, ymax = (ymin, ymax) if y_range else (ymin - pad, ymax + pad)
    fx = lambda v: left + (v - xmin) / max(xmax - xmin, 1e-9) * (right - left)  # noqa: E731
    fy = lambda v: bottom - (v - ymin) / (ymax - ymin) * (bottom - top)  # noqa: E731
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for t in _nice_ticks(ymin, ymax):
        draw.line([left - 4, fy(t), left, fy(t)], fill=(0, 0, 0))
        draw.line([left + 1, fy(t), right - 1, fy(t)], fill=(230, 230, 230))
        draw.text((x0 + 4, fy(t) - 6), f"{t:g}", fill=(0, 0, 0), font=font)
    for t in _nice_ticks(xmin, xmax):
        draw.line([fx(t), bottom, fx(t), bottom + 4], fill=(0, 0, 0))
        draw.text((fx(t) - 8, bottom + 6), f"{t:g}", fill=(0, 0, 0), font=font)
    draw.text(((left + right) // 2 - 30, bottom + 20), "training step", fill=(0, 0, 0), font=font)
    for name, v in hlines.items():
        y = fy(v)
        for xa in range(int(left), int(right), 10):
            draw.line([xa, y, min(xa + 5, right), y], fill=(90, 90, 90), width=2)
    for name, pts in series.items():
        pts = sorted(pts)
        c = colours[name]
        draw.line([(fx(a), fy(b)) for a, b in pts], fill=c, width=3 if len(pts) <= 60 else 1)
        for a, b in (pts if len(pts) <= 60 else []):  # markers only where they stay readable
            draw.ellipse([fx(a) - 3, fy(b) - 3, fx(a) + 3, fy(b) + 3], fill=c)


def learning_curves(path: str, panels: List[Dict], names: Sequence[str], width: int = 1200, height: int = 430,
                    legend_base: str = "base model (no LoRA)"):
    """panels: [{title, series: {name: [(step, value)]}, base: float|None, y_range: (lo, hi)|None}]."""
    font = ImageFont.load_default()
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    colours = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    w = width // len(panels)
    for i, p in enumerate(panels):
        hl = {"base": p["base"]} if p.get("base") is not None else {}
        _panel(draw, (i * w, 0, (i + 1) * w, height - 40), p["title"], p["series"], colours, hl,
               p.get("y_range"), font)
    x = 60
    for n in names:
        draw.line([x, height - 22, x + 24, height - 22], fill=colours[n], width=3)
        draw.text((x + 30, height - 28), n, fill=(0, 0, 0), font=font)
        x += 40 + 7 * len(n)
    if legend_base:
        for xa in range(x, x + 24, 10):
            draw.line([xa, height - 22, xa + 5, height - 22], fill=(90, 90, 90), width=2)
        draw.text((x + 30, height - 28), legend_base, fill=(0, 0, 0), font=font)
    img.save(path)
