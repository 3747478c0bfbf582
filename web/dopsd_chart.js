// comfyui-dopsd: the loss chart and number formatting. A plain ES module with no side effects:
// the ComfyUI frontend imports every .js under web/, and dopsd.js imports this one too.

/** Seconds as "42s", "3m 05s", "1h 02m". */
export function formatDuration(seconds) {
  if (seconds == null || !isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
}

/** A loss value with 4 significant digits ("0.01234", "1.234e-5"). */
export function formatLoss(value) {
  if (value == null || !isFinite(value)) return "–";
  const a = Math.abs(value);
  if (a !== 0 && (a < 1e-3 || a >= 1e4)) return value.toExponential(3);
  return value.toPrecision(4);
}

/** Exponential moving average of the y values (what the bright line shows). */
export function smooth(points, weight = 0.8) {
  const out = [];
  let avg = null;
  for (const [x, y] of points) {
    avg = avg == null ? y : weight * avg + (1 - weight) * y;
    out.push([x, avg]);
  }
  return out;
}

/** A compact axis label: 3 significant digits, exponent form for very small or large values. */
export function formatAxis(value) {
  if (value == null || !isFinite(value)) return "";
  const a = Math.abs(value);
  if (a === 0) return "0";
  if (a < 1e-2 || a >= 1e4) return value.toExponential(1);
  return String(Number(value.toPrecision(3)));
}

function niceRange(lo, hi) {
  if (!isFinite(lo) || !isFinite(hi)) return [0, 1];
  if (hi - lo < 1e-12) {
    const pad = Math.abs(hi) * 0.1 || 0.1;
    return [lo - pad, hi + pad];
  }
  const pad = (hi - lo) * 0.08;
  return [lo - pad, hi + pad];
}

/**
 * Draws the loss curve of `points` ([[step, loss], ...]) on `canvas`, sized to its CSS box and the device pixel
 * ratio. x runs over the steps logged so far; the last label also shows `totalSteps`. Colours come from the
 * canvas's computed CSS (color: axes/labels; --dopsd-line: the smoothed curve). Returns the number of points drawn
 * (0 when the canvas is not laid out, e.g. hidden).
 */
export function drawLossChart(canvas, points, totalSteps) {
  const cssW = canvas.clientWidth, cssH = canvas.clientHeight;
  if (!cssW || !cssH) return 0;
  const dpr = window.devicePixelRatio || 1;
  const w = Math.round(cssW * dpr), h = Math.round(cssH * dpr);
  if (canvas.width !== w || canvas.height !== h) {
    canvas.width = w;
    canvas.height = h;
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);

  const style = getComputedStyle(canvas);
  const fg = style.color || "#aaa";
  const line = style.getPropertyValue("--dopsd-line").trim() || "#4fa3ff";
  const raw = style.getPropertyValue("--dopsd-line-raw").trim() || "rgba(127,127,127,0.6)";
  ctx.font = "10px sans-serif";
  ctx.textBaseline = "middle";

  const finite = (points || []).filter((p) => p && isFinite(p[0]) && isFinite(p[1]));
  let lo = Infinity, hi = -Infinity;
  for (const [, y] of finite) { lo = Math.min(lo, y); hi = Math.max(hi, y); }
  const [y0, y1] = finiteRangeOrDefault(lo, hi);
  const labels = [0, 1, 2].map((i) => (finite.length ? formatAxis(y1 - (i / 2) * (y1 - y0)) : ""));
  const labelW = Math.max(0, ...labels.map((t) => ctx.measureText(t).width));
  const left = Math.ceil(labelW) + 8, right = 6, top = 7, bottom = 14;
  const plotW = Math.max(10, cssW - left - right), plotH = Math.max(10, cssH - top - bottom);
  // x spans the steps seen so far (not the whole run), so a long job's curve is readable from the start.
  const firstStep = finite.length ? finite[0][0] : 0;
  const lastStep = finite.length ? finite[finite.length - 1][0] : 0;
  const xMin = finite.length > 1 ? firstStep : 0;
  const xMax = Math.max(xMin + 1, lastStep);
  const X = (x) => left + ((x - xMin) / (xMax - xMin)) * plotW;
  const Y = (y) => top + (1 - (y - y0) / (y1 - y0)) * plotH;

  // Grid and labels.
  ctx.strokeStyle = fg;
  ctx.fillStyle = fg;
  ctx.globalAlpha = 0.25;
  ctx.lineWidth = 1;
  ctx.beginPath();
  for (let i = 0; i <= 2; i++) {
    const y = top + (i / 2) * plotH;
    ctx.moveTo(left, Math.round(y) + 0.5);
    ctx.lineTo(left + plotW, Math.round(y) + 0.5);
  }
  ctx.stroke();
  ctx.globalAlpha = 0.8;
  ctx.textAlign = "right";
  for (let i = 0; i <= 2; i++) ctx.fillText(labels[i], left - 4, top + (i / 2) * plotH);
  if (finite.length) {
    ctx.textAlign = "left";
    ctx.fillText(`step ${xMin}`, left, cssH - 6);
    ctx.textAlign = "right";
    ctx.fillText(totalSteps ? `${lastStep} / ${totalSteps}` : `${lastStep}`, left + plotW, cssH - 6);
  }
  ctx.globalAlpha = 1;

  if (!finite.length) {
    ctx.textAlign = "center";
    ctx.globalAlpha = 0.7;
    ctx.fillText("loss appears here once training runs", left + plotW / 2, top + plotH / 2);
    ctx.globalAlpha = 1;
    return 0;
  }

  const path = (pts, color, width) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    ctx.beginPath();
    pts.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
  };
  ctx.lineJoin = "round";
  path(finite, raw, 1);
  const sm = smooth(finite);
  path(sm, line, 2);
  const [lx, ly] = sm[sm.length - 1];
  ctx.fillStyle = line;
  ctx.beginPath();
  ctx.arc(X(lx), Y(ly), 2.5, 0, Math.PI * 2);
  ctx.fill();
  return finite.length;
}

function finiteRangeOrDefault(lo, hi) {
  if (lo === Infinity) return [0, 1];
  return niceRange(lo, hi);
}
