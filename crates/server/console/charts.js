// Small SVG charts drawn here (no charting library): the planner's frontier and a usage
// histogram. Colours come from CSS classes (m0, m1, ...): the policy allows no inline style.

import { si } from './format.js';

const NS = 'http://www.w3.org/2000/svg';

function s(tag, attrs = {}, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== null && v !== undefined) e.setAttribute(k, v);
  }
  if (text !== undefined) e.textContent = text;
  return e;
}

/** Per model, the candidates no cheaper one beats: (cost, predicted error) in cost order. */
export function frontiers(candidates) {
  const byModel = new Map();
  for (const c of candidates) {
    if (!byModel.has(c.model)) byModel.set(c.model, []);
    byModel.get(c.model).push(c);
  }
  const out = [];
  for (const [model, list] of byModel) {
    list.sort((a, b) => a.cost_flops - b.cost_flops || a.predicted_error - b.predicted_error);
    const front = [];
    let best = Infinity;
    for (const c of list) {
      if (c.predicted_error < best) {
        front.push(c);
        best = c.predicted_error;
      }
    }
    out.push({ model, lmParams: list[0].lm_params, all: list, front });
  }
  out.sort((a, b) => a.lmParams - b.lmParams);
  return out;
}

/** 1-2-5 ticks between 10^lo and 10^hi (at most ~6). */
function errorTicks(lo, hi) {
  const all = [];
  for (let e = Math.floor(lo); e <= Math.ceil(hi); e++) {
    for (const k of [1, 2, 5]) {
      const v = k * 10 ** e;
      if (Math.log10(v) >= lo && Math.log10(v) <= hi) all.push(Number(v.toPrecision(2)));
    }
  }
  const step = Math.ceil(all.length / 6);
  return all.filter((_, i) => i % step === 0);
}

function decades(lo, hi) {
  const ticks = [];
  for (let e = Math.ceil(lo); e <= Math.floor(hi); e++) ticks.push(e);
  if (ticks.length < 2) {
    const step = (hi - lo) / 3;
    return [lo, lo + step, lo + 2 * step, hi];
  }
  return ticks;
}

/**
 * The frontier plot: predicted error against FLOPs (log), one line per model over its cloud of
 * candidates, the budget, the chosen point, the runners-up and (optionally) a naive point.
 * Returns an <svg> with a title and a description for screen readers.
 */
export function frontierChart({ models, budget, choice, runnersUp = [], naive = null }) {
  const W = 640;
  const H = 340;
  const m = { l: 56, r: 14, t: 14, b: 44 };
  const svg = s('svg', {
    viewBox: `0 0 ${W} ${H}`, class: 'chart frontier', role: 'img', 'aria-labelledby': 'fr-title fr-desc',
  });
  svg.append(s('title', { id: 'fr-title' }, 'Predicted error against FLOPs per model'));
  const desc = choice
    ? `Budget ${si(budget)} FLOPs. Chosen: ${choice.model}, ${choice.frames} frames x ${choice.tokens_per_frame} tokens per frame, predicted error ${choice.predicted_error.toFixed(2)}, cost ${si(choice.cost_flops)}.`
    : `Budget ${si(budget)} FLOPs: no configuration fits.`;
  svg.append(s('desc', { id: 'fr-desc' }, desc));
  const all = models.flatMap((x) => x.all);
  if (!all.length) return svg;
  let x0 = Math.log10(Math.min(...all.map((c) => c.cost_flops)));
  let x1 = Math.log10(Math.max(...all.map((c) => c.cost_flops)));
  if (budget > 0) {
    x0 = Math.min(x0, Math.log10(budget));
    x1 = Math.max(x1, Math.log10(budget));
  }
  x0 -= 0.05;
  x1 += 0.05;
  // Predicted error on a log scale (the laws are fitted on log error): the cheap end, where
  // the error is large, does not flatten the interesting part.
  const errs = all.map((c) => Math.max(c.predicted_error, 1e-3));
  const y0 = Math.log10(Math.min(...errs)) - 0.05;
  const y1 = Math.log10(Math.max(...errs)) + 0.05;
  const X = (v) => m.l + ((Math.log10(v) - x0) / (x1 - x0)) * (W - m.l - m.r);
  const Y = (e) => m.t + ((y1 - Math.log10(Math.max(e, 1e-3))) / (y1 - y0)) * (H - m.t - m.b);

  const axes = s('g', { class: 'axes' });
  for (const e of decades(x0, x1)) {
    const x = X(10 ** e);
    axes.append(s('line', { x1: x, x2: x, y1: m.t, y2: H - m.b, class: 'grid' }));
    axes.append(s('text', { x, y: H - m.b + 16, 'text-anchor': 'middle' }, si(10 ** e, 2)));
  }
  for (const e of errorTicks(y0, y1)) {
    const y = Y(e);
    axes.append(s('line', { x1: m.l, x2: W - m.r, y1: y, y2: y, class: 'grid' }));
    axes.append(s('text', { x: m.l - 6, y: y + 4, 'text-anchor': 'end' }, String(e)));
  }
  axes.append(s('text', { x: (m.l + W - m.r) / 2, y: H - 6, 'text-anchor': 'middle' }, 'FLOPs per request (log scale)'));
  axes.append(s('text', {
    x: 14, y: (m.t + H - m.b) / 2, 'text-anchor': 'middle', transform: `rotate(-90 14 ${(m.t + H - m.b) / 2})`,
  }, 'predicted error (log scale)'));
  svg.append(axes);

  models.forEach((mod, i) => {
    const g = s('g', { class: `model m${i % 6}` });
    for (const c of mod.all) {
      g.append(s('circle', { cx: X(c.cost_flops), cy: Y(c.predicted_error), r: 1.6, class: 'cloud' }));
    }
    const pts = [];
    mod.front.forEach((c, k) => {
      if (k > 0) pts.push(`${X(c.cost_flops)},${Y(mod.front[k - 1].predicted_error)}`);
      pts.push(`${X(c.cost_flops)},${Y(c.predicted_error)}`);
    });
    if (pts.length) pts.push(`${X(10 ** x1)},${Y(mod.front[mod.front.length - 1].predicted_error)}`);
    g.append(s('polyline', { points: pts.join(' '), class: 'front' }));
    svg.append(g);
  });

  if (budget > 0) {
    const x = X(budget);
    svg.append(s('line', { x1: x, x2: x, y1: m.t, y2: H - m.b, class: 'budget' }));
    svg.append(s('text', { x: x + 4, y: m.t + 12, class: 'label' }, `budget ${si(budget)}`));
  }
  for (const c of runnersUp) {
    svg.append(s('circle', { cx: X(c.cost_flops), cy: Y(c.predicted_error), r: 4.5, class: 'runner' }));
  }
  if (naive) {
    const x = X(naive.cost_flops);
    const y = Y(naive.predicted_error);
    svg.append(s('rect', { x: x - 5, y: y - 5, width: 10, height: 10, class: 'naive', transform: `rotate(45 ${x} ${y})` }));
    svg.append(s('text', { x: x - 9, y: y + 18, class: 'label', 'text-anchor': 'end' }, 'naive'));
  }
  if (choice) {
    const x = X(choice.cost_flops);
    const y = Y(choice.predicted_error);
    svg.append(s('circle', { cx: x, cy: y, r: 7, class: 'choice' }));
    svg.append(s('text', { x: x + 10, y: y - 8, class: 'label' }, `plan: ${choice.model} T${choice.frames} V${choice.tokens_per_frame}`));
  }
  return svg;
}

/** A bar chart of charged FLOPs per time bucket. */
export function usageChart(points, bucketS) {
  const W = 640;
  const H = 200;
  const m = { l: 56, r: 10, t: 12, b: 36 };
  const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart usage', role: 'img', 'aria-labelledby': 'us-title us-desc' });
  const total = points.reduce((a, p) => a + p.charged_flops, 0);
  const n = points.reduce((a, p) => a + p.requests, 0);
  svg.append(s('title', { id: 'us-title' }, 'Charged FLOPs over time'));
  svg.append(s('desc', { id: 'us-desc' }, `${si(total)} FLOPs charged over ${n} requests in the ${points.length} buckets shown.`));
  const max = Math.max(...points.map((p) => p.charged_flops), 1);
  const bw = (W - m.l - m.r) / Math.max(points.length, 1);
  const Y = (v) => m.t + (1 - v / max) * (H - m.t - m.b);
  for (let i = 0; i <= 2; i++) {
    const v = (max * i) / 2;
    svg.append(s('line', { x1: m.l, x2: W - m.r, y1: Y(v), y2: Y(v), class: 'grid' }));
    svg.append(s('text', { x: m.l - 6, y: Y(v) + 4, 'text-anchor': 'end' }, si(v, 2)));
  }
  points.forEach((p, i) => {
    if (p.charged_flops > 0) {
      const r = s('rect', {
        x: m.l + i * bw + 1, y: Y(p.charged_flops), width: Math.max(bw - 2, 1), height: H - m.b - Y(p.charged_flops), class: 'bar',
      });
      r.append(s('title', {}, `${new Date(p.start * 1000).toLocaleString()}: ${si(p.charged_flops)} FLOPs, ${p.requests} requests`));
      svg.append(r);
    }
  });
  const fmt = (t) => {
    const d = new Date(t * 1000);
    return bucketS >= 86400 ? d.toLocaleDateString() : d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  };
  if (points.length) {
    svg.append(s('text', { x: m.l, y: H - 12, 'text-anchor': 'start' }, fmt(points[0].start)));
    svg.append(s('text', { x: W - m.r, y: H - 12, 'text-anchor': 'end' }, fmt(points[points.length - 1].start)));
  }
  return svg;
}
