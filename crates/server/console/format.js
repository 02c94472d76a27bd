// Number formatting shared by the console's pages.

const PREFIXES = [[1e15, 'P'], [1e12, 'T'], [1e9, 'G'], [1e6, 'M'], [1e3, 'k']];

/** FLOPs (or any count) with an SI prefix: 1.23G (999.96G is 1.00T, never 1.00e+3G). */
export function si(v, digits = 3) {
  if (v === null || v === undefined || !Number.isFinite(v)) return '-';
  if (v === 0) return '0';
  const scales = [[1, ''], ...PREFIXES.slice().reverse()]; // 1, k, M, G, T, P
  const a = Math.abs(v);
  let i = scales.length - 1;
  while (i > 0 && a < scales[i][0]) i--;
  let x = (v / scales[i][0]).toPrecision(digits);
  if (Math.abs(Number(x)) >= 1000 && i < scales.length - 1) {
    i++;
    x = (v / scales[i][0]).toPrecision(digits);
  }
  if (x.includes('e')) x = String(Number(x)); // 1.0e+2 -> 100
  return `${x}${scales[i][1]}`;
}

/** Seconds: 0.81 s, 12 ms. */
export function secs(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return '-';
  return v < 1 ? `${(v * 1000).toFixed(1)} ms` : `${v.toFixed(2)} s`;
}

export function pct(v) {
  return Number.isFinite(v) ? `${v.toFixed(1)}%` : '-';
}

/** A Unix time as local date and time. */
export function when(t) {
  if (!t) return '-';
  return new Date(t * 1000).toLocaleString();
}

/** Parses `5e12`, `5T`, `1.5G` (as the API does); NaN when not a number. */
export function parseFlops(text) {
  const m = String(text).trim().match(/^([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKMGTP]?)$/);
  if (!m) return NaN;
  const scale = { '': 1, k: 1e3, K: 1e3, M: 1e6, G: 1e9, T: 1e12, P: 1e15 }[m[2]];
  return parseFloat(m[1]) * scale;
}

/** Creates an element with attributes and children (text or nodes): no HTML strings. */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'text') e.textContent = v;
    else if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

/** A table (caption, header row, rows of cells: text or nodes) in a box that scrolls sideways
 * on a narrow screen instead of the page. */
export function table(caption, headers, rows, cls = '') {
  return el('div', { class: 'scroll' }, el('table', { class: cls },
    el('caption', { text: caption }),
    el('thead', {}, el('tr', {}, headers.map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, rows.map((r) => el('tr', {}, r.map((c, i) => (i === 0
      ? el('th', { scope: 'row' }, c) : el('td', {}, c))))))));
}
