// The tenants page (admin key): quotas and usage this period, usage over time, recent requests
// with their plan and charge; create a tenant, change a quota or its share of the server (the
// requests it may have in flight, its weight) or where its media may be read from, rotate a
// key. Only the admin API.

import { call, getKey, setKey, ApiError } from './api.js';
import { usageChart } from './charts.js';
import { si, when, el, table, parseFlops } from './format.js';

const $ = (id) => document.getElementById(id);
let selected = null;

function fail(e) {
  $('tenants-error').textContent = e instanceof ApiError ? e.describe() : String(e);
}

function ok() {
  $('tenants-error').textContent = '';
}

// A limit of requests in flight: undefined when empty (the server's default), else 1 or more.
function countField(id, what) {
  const text = $(id).value.trim();
  if (!text) return undefined;
  if (!/^[0-9]+$/.test(text) || Number(text) < 1) throw new ApiError(422, 'validation', `${what}: "${text}" is not a whole number of requests, 1 or more`);
  return Number(text);
}

// A weight: undefined when empty (1), else a number from 0.01 to 100.
function weightField(id) {
  const text = $(id).value.trim();
  if (!text) return undefined;
  const v = Number(text);
  if (!Number.isFinite(v) || v < 0.01 || v > 100) throw new ApiError(422, 'validation', `weight: "${text}" is not a number from 0.01 to 100`);
  return v;
}

function flopsField(id, what) {
  const text = $(id).value.trim();
  if (!text) return undefined;
  const v = parseFlops(text);
  if (!Number.isFinite(v)) throw new ApiError(422, 'validation', `${what}: "${text}" is not a number of FLOPs such as 1e15 or 2P`);
  return v;
}

async function refresh() {
  if (!getKey('admin')) {
    $('tenant-list').replaceChildren(el('p', { text: 'Enter the admin key to see tenants.' }));
    return;
  }
  try {
    const { tenants } = await call('admin', 'GET', '/admin/tenants');
    ok();
    const rows = tenants.map(({ tenant: t, usage: u, places_held: held }) => {
      const used = u.charged_flops + u.reserved_flops;
      const meter = t.quota
        ? el('meter', { min: 0, max: t.quota, value: Math.min(used, t.quota), 'aria-label': `${t.name}: ${si(used)} of ${si(t.quota)} used` })
        : el('span', { text: 'unlimited' });
      return [
        el('button', { type: 'button', class: 'link', onclick: () => select(t.name), 'aria-label': `Show tenant ${t.name}` }, t.name),
        t.quota === null ? 'unlimited' : si(t.quota),
        si(u.charged_flops), si(u.reserved_flops), meter,
        u.remaining === null ? '-' : si(u.remaining),
        String(u.requests), t.period, when(u.reset_at),
        String(held),
        t.weight == null ? '1' : String(t.weight),
        t.max_in_flight == null ? 'default' : String(t.max_in_flight),
      ];
    });
    $('tenant-list').replaceChildren(rows.length
      ? table('Tenants: quota, used (charged) and reserved FLOPs this period', ['tenant', 'quota', 'used', 'reserved', 'of quota', 'remaining', 'requests', 'period', 'resets', 'in flight', 'weight', 'max in flight'], rows, 'tenants')
      : el('p', { text: 'No tenants yet: create one below.' }));
    if (selected && tenants.some((x) => x.tenant.name === selected)) await detail();
  } catch (e) {
    // A refused key is not kept.
    if (e.status === 401) setKey('admin', '');
    $('tenant-list').replaceChildren();
    fail(e);
  }
}

async function select(name) {
  selected = name;
  $('tenant-key-out').replaceChildren();
  $('tenant-detail').hidden = false;
  $('td-title').textContent = `Tenant ${name}`;
  await detail();
  $('td-title').setAttribute('tabindex', '-1');
  $('td-title').focus();
}

async function detail() {
  const [bucket, buckets] = $('usage-range').value.split(':').map(Number);
  try {
    const path = `/admin/tenants/${encodeURIComponent(selected)}`;
    const [t, h] = await Promise.all([
      call('admin', 'GET', path),
      call('admin', 'GET', `${path}/requests?limit=20&bucket_s=${bucket}&buckets=${buckets}`),
    ]);
    ok();
    $('quota').value = t.quota === null ? '' : si(t.quota);
    $('in-flight').value = t.max_in_flight == null ? '' : String(t.max_in_flight);
    $('weight').value = t.weight == null ? '' : String(t.weight);
    $('media-allow').value = t.media_allow == null ? '' : t.media_allow.join('\n');
    $('usage-chart').replaceChildren(usageChart(h.series.points, h.series.bucket_s));
    const rows = h.requests.map((r) => {
      const p = r.plan || {};
      return [when(r.created_at), p.task || '-', p.model || '-', p.frames ?? '-', p.tokens_per_frame ?? '-',
        si(p.budget_flops), si(r.reserved_flops), r.charged_flops === null ? '-' : si(r.charged_flops), r.state];
    });
    $('requests').replaceChildren(rows.length
      ? table(`Recent requests of ${selected}: plan and charge`, ['time', 'task', 'model', 'frames', 'tokens/frame', 'budget', 'reserved', 'charged', 'state'], rows, 'requests')
      : el('p', { text: 'No requests yet.' }));
  } catch (e) {
    fail(e);
  }
}

function showKey(target, name, key) {
  const out = $(target);
  const use = el('button', {
    type: 'button',
    class: 'secondary',
    onclick: () => {
      setKey('tenant', key);
      use.textContent = 'Used in the playground';
      use.disabled = true;
    },
  }, 'Use this key in the playground');
  out.replaceChildren(
    el('p', { text: `API key of ${name} (shown once: copy it now):` }),
    el('code', { class: 'key', tabindex: '0' }, key),
    use,
  );
}

async function create(ev) {
  ev.preventDefault();
  try {
    const body = { name: $('new-name').value.trim(), period: $('new-period').value };
    const quota = flopsField('new-quota', 'quota');
    const max = flopsField('new-max', 'largest budget');
    const def = flopsField('new-default', 'default budget');
    if (quota !== undefined) body.quota = quota;
    if (max !== undefined) body.per_request_max = max;
    if (def !== undefined) body.default_budget = def;
    const inFlight = countField('new-in-flight', 'requests in flight');
    if (inFlight !== undefined) body.max_in_flight = inFlight;
    const weight = weightField('new-weight');
    if (weight !== undefined) body.weight = weight;
    const r = await call('admin', 'POST', '/admin/tenants', body);
    ok();
    showKey('created-key-out', r.tenant.name, r.api_key);
    $('create-form').reset();
    await refresh();
  } catch (e) {
    fail(e);
  }
}

async function setQuota(ev) {
  ev.preventDefault();
  try {
    const q = flopsField('quota', 'quota');
    if (q === undefined) throw new ApiError(422, 'validation', 'type a quota, or use "Remove quota"');
    await call('admin', 'PATCH', `/admin/tenants/${encodeURIComponent(selected)}`, { quota: q });
    await refresh();
  } catch (e) {
    fail(e);
  }
}

async function removeQuota() {
  try {
    await call('admin', 'PATCH', `/admin/tenants/${encodeURIComponent(selected)}`, { quota: null });
    await refresh();
  } catch (e) {
    fail(e);
  }
}

async function setShare(ev) {
  ev.preventDefault();
  try {
    // Empty: back to the server's default limit, and to weight 1.
    const m = countField('in-flight', 'requests in flight');
    const w = weightField('weight');
    await call('admin', 'PATCH', `/admin/tenants/${encodeURIComponent(selected)}`, {
      max_in_flight: m === undefined ? null : m,
      weight: w === undefined ? null : w,
    });
    await refresh();
  } catch (e) {
    fail(e);
  }
}

// The media prefixes, one per line; empty: back to the server's lists alone.
async function setMedia(ev) {
  ev.preventDefault();
  try {
    const lines = $('media-allow').value.split('\n').map((l) => l.trim()).filter((l) => l);
    const bad = lines.find((l) => !/^(https?:\/\/[^/\s]+|file:\/\/\/)/.test(l));
    if (bad) throw new ApiError(422, 'validation', `media prefixes: "${bad}" is not an http(s):// URL or a file:/// folder`);
    await call('admin', 'PATCH', `/admin/tenants/${encodeURIComponent(selected)}`, {
      media_allow: lines.length ? lines : null,
    });
    await refresh();
  } catch (e) {
    fail(e);
  }
}

async function rotate() {
  try {
    const r = await call('admin', 'POST', `/admin/tenants/${encodeURIComponent(selected)}/key`);
    ok();
    showKey('tenant-key-out', r.tenant.name, r.api_key);
  } catch (e) {
    fail(e);
  }
}

export function start() {
  $('admin-key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const v = $('admin-key').value.trim();
    if (v) setKey('admin', v);
    $('admin-key').value = '';
    refresh();
  });
  $('admin-key-forget').addEventListener('click', () => {
    setKey('admin', '');
    $('tenant-list').replaceChildren();
    $('tenant-detail').hidden = true;
    selected = null;
  });
  $('tenants-refresh').addEventListener('click', refresh);
  $('create-form').addEventListener('submit', create);
  $('quota-form').addEventListener('submit', setQuota);
  $('quota-remove').addEventListener('click', removeQuota);
  $('in-flight-form').addEventListener('submit', setShare);
  $('media-form').addEventListener('submit', setMedia);
  $('rotate').addEventListener('click', rotate);
  $('usage-range').addEventListener('change', detail);
  refresh();
}

export function shown() {
  refresh();
}
