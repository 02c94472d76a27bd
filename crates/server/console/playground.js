// The playground: a video, a question, a budget slider that calls /v1/plan as it moves, the
// frontier plot, and runs streamed from /v1/chat/completions (SSE), optionally side by side
// with a naive configuration at the same budget.

import { call, stream, getKey, setKey, dataUrl, ApiError } from './api.js';
import { frontierChart, frontiers } from './charts.js';
import { si, secs, el, table } from './format.js';

const $ = (id) => document.getElementById(id);

const state = {
  video: null, // { name, blob, url }
  samples: [],
  candidates: null, // every configuration of the current (task, prompt, max_tokens)
  candidatesKey: '',
  models: [],
  plan: null,
  seq: 0,
  timer: 0,
  running: null, // AbortController
};

function budget() {
  return 10 ** parseFloat($('budget').value);
}

function request() {
  return {
    task: $('task').value || 'qa',
    prompt: $('question').value.trim(),
    max_tokens: Math.max(1, parseInt($('max-tokens').value, 10) || 32),
  };
}

// ---------------------------------------------------------------- key

async function useKey(ev) {
  if (ev) ev.preventDefault();
  const v = $('tenant-key').value.trim();
  if (v) setKey('tenant', v);
  $('tenant-key').value = '';
  await loadModels();
}

async function loadModels() {
  const status = $('tenant-key-status');
  if (!getKey('tenant')) {
    status.textContent = 'No key yet: paste a tenant API key (vvlm tenant add, or the Tenants page).';
    status.className = 'status';
    return;
  }
  try {
    const [models, usage] = await Promise.all([call('tenant', 'GET', '/v1/models'), call('tenant', 'GET', '/v1/usage')]);
    state.models = models.data;
    const task = $('task');
    const keep = task.value;
    task.replaceChildren(...models.tasks.map((t) => el('option', { value: t, text: t })));
    task.value = models.tasks.includes(keep) ? keep : (models.tasks.includes('caption') ? 'caption' : models.tasks[0]);
    const left = usage.remaining === null ? 'unlimited quota' : `${si(usage.remaining)} FLOPs left this ${usage.period}`;
    status.textContent = `Key accepted: tenant ${usage.tenant}, ${left}.`;
    status.className = 'status ok';
    state.candidatesKey = '';
    replan(0);
  } catch (e) {
    // A refused key is not kept.
    if (e.status === 401) setKey('tenant', '');
    status.textContent = e instanceof ApiError ? e.describe() : String(e);
    status.className = 'status bad';
    $('plan-status').textContent = 'Enter a valid tenant key to plan.';
  }
}

// ---------------------------------------------------------------- video

function setVideo(name, blob) {
  if (state.video) URL.revokeObjectURL(state.video.url);
  const url = URL.createObjectURL(blob);
  state.video = { name, blob, url };
  const v = $('preview');
  v.src = url;
  v.hidden = false;
  $('video-name').textContent = `Video: ${name} (${si(blob.size)}B)`;
}

function showExpected() {
  const s = state.samples.find((x) => x.file === $('sample').value);
  const q = $('question').value.trim();
  const item = s && s.items.find((i) => i.question === q);
  $('expected').textContent = item ? `Expected answer (suite ground truth): ${item.answer}` : '';
}

async function pickSample() {
  const file = $('sample').value;
  if (!file) return;
  try {
    const r = await fetch(`/console/samples/${encodeURIComponent(file)}`);
    if (!r.ok) throw new Error(`${r.status}`);
    setVideo(file, await r.blob());
    const s = state.samples.find((x) => x.file === file);
    $('questions').replaceChildren(...s.items.map((i) => el('option', { value: i.question, label: `${i.family}: ${i.question}` })));
    showExpected();
  } catch (e) {
    $('video-name').textContent = `Could not load ${file}: ${e.message}`;
  }
}

async function loadSamples() {
  try {
    const r = await fetch('/console/samples/samples.json');
    state.samples = await r.json();
    $('sample').append(...state.samples.map((s) => el('option', { value: s.file, text: s.file })));
  } catch (_) {
    // the samples are optional
  }
}

function wireDrop() {
  const drop = $('drop');
  ['dragenter', 'dragover'].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault();
    drop.classList.add('over');
  }));
  ['dragleave', 'drop'].forEach((t) => drop.addEventListener(t, () => drop.classList.remove('over')));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    const f = e.dataTransfer.files[0];
    if (f) {
      $('sample').value = '';
      setVideo(f.name, f);
      showExpected();
    }
  });
  $('video-file').addEventListener('change', () => {
    const f = $('video-file').files[0];
    if (f) {
      $('sample').value = '';
      setVideo(f.name, f);
      showExpected();
    }
  });
}

// ---------------------------------------------------------------- plan

/** The naive rule: the biggest model, 8 frames, the most tokens per frame that fit (fewer
 * frames when 8 do not fit; the next model when nothing of the biggest fits). */
export function naivePick(candidates, budgetFlops) {
  const models = [...new Set(candidates.map((c) => c.model))]
    .map((m) => ({ m, n: candidates.find((c) => c.model === m).lm_params }))
    .sort((a, b) => b.n - a.n);
  for (const { m } of models) {
    const fits = candidates.filter((c) => c.model === m && c.cost_flops <= budgetFlops && c.frames <= 8);
    if (!fits.length) continue;
    const frames = Math.max(...fits.map((c) => c.frames));
    return fits.filter((c) => c.frames === frames).sort((a, b) => b.tokens_per_frame - a.tokens_per_frame)[0];
  }
  return null;
}

function replan(delay = 120) {
  $('budget-value').textContent = si(budget());
  clearTimeout(state.timer);
  state.timer = setTimeout(plan, delay);
}

async function plan() {
  if (!getKey('tenant')) return;
  const r = request();
  if (!r.prompt) {
    $('plan-status').textContent = 'Type a question (or a prompt) to plan.';
    return;
  }
  const key = `${r.task}\u0000${r.prompt}\u0000${r.max_tokens}`;
  const wantCandidates = key !== state.candidatesKey;
  const seq = ++state.seq;
  const b = budget();
  try {
    const p = await call('tenant', 'POST', '/v1/plan', { ...r, budget: b, candidates: wantCandidates });
    if (seq !== state.seq) return; // a newer request is on its way
    if (wantCandidates) {
      state.candidates = p.candidates;
      state.candidatesKey = key;
      fitSlider();
    }
    state.plan = p;
    $('plan-status').textContent = `Planned for ${si(b)} FLOPs (${p.considered} configurations considered).`;
    $('plan-status').className = 'status ok';
    showPlan(p);
  } catch (e) {
    if (seq !== state.seq) return;
    state.plan = null;
    $('plan-status').textContent = e instanceof ApiError ? e.describe() : String(e);
    $('plan-status').className = 'status bad';
    $('plan-summary').replaceChildren();
    $('plan-cost').replaceChildren();
    if (e.status === 401) state.candidatesKey = '';
    drawFrontier(null);
  }
}

/** The slider spans the cheapest to the dearest configuration of the current request. */
function fitSlider() {
  if (!state.candidates || !state.candidates.length) return;
  const costs = state.candidates.map((c) => c.cost_flops);
  // From the cheapest configuration (so that the lowest position plans) to past the dearest.
  const lo = Math.ceil(Math.log10(Math.min(...costs)) * 100) / 100;
  const hi = Math.ceil(Math.log10(Math.max(...costs)) * 10) / 10 + 0.1;
  const s = $('budget');
  const v = Math.min(Math.max(parseFloat(s.value), lo), hi);
  s.min = String(lo);
  s.max = String(hi);
  s.value = String(v);
  s.setAttribute('aria-valuetext', `${si(10 ** v)} FLOPs`);
  $('budget-value').textContent = si(10 ** v);
}

function costRows(parts) {
  const names = [['vision', 'vision tower'], ['projector', 'projector'], ['lm_prefill', 'LM prefill'], ['lm_decode', 'LM decode']];
  const total = names.reduce((a, [k]) => a + (parts[k] || 0), 0);
  return names.map(([k, label]) => [label, si(parts[k] || 0), total ? `${((100 * (parts[k] || 0)) / total).toFixed(1)}%` : '-'])
    .concat([['total', si(total), '100%']]);
}

function showPlan(p) {
  const dl = $('plan-summary');
  const item = (k, v, id) => [el('dt', { text: k }), el('dd', { id, text: v })];
  dl.replaceChildren(
    ...item('checkpoint (x_N)', `${p.model} (${si(p.lm_params)} LM parameters)`, 'plan-model'),
    ...item('frames (x_T)', String(p.frames), 'plan-frames'),
    ...item('tokens per frame (x_V)', `${p.tokens_per_frame} (${p.side}x${p.side})`, 'plan-tokens'),
    ...item('predicted error', `${p.predicted_error.toFixed(2)} (score ${p.predicted_score.toFixed(2)})`, 'plan-error'),
    ...item('cost', `${si(p.cost_flops)} FLOPs of ${si(p.budget_flops)} (${p.cost_mode})`, 'plan-cost-total'),
  );
  $('plan-cost').replaceChildren(p.cost_by_component
    ? table(`Planned cost by component (${p.cost_mode} count)`, ['component', 'FLOPs', 'share'], costRows(p.cost_by_component), 'cost')
    : '');
  drawFrontier(p);
}

function drawFrontier(p) {
  if (!state.candidates) return;
  const models = frontiers(state.candidates);
  const naive = $('side-by-side').checked ? naivePick(state.candidates, budget()) : null;
  $('frontier').replaceChildren(frontierChart({
    models, budget: budget(), choice: p, runnersUp: p ? p.runners_up : [], naive,
  }));
  $('legend').replaceChildren(...models.map((m, i) => el('li', {},
    el('span', { class: `swatch m${i % 6}`, 'aria-hidden': 'true' }), `${m.model} (${si(m.lmParams)} LM parameters)`)));
}

// ---------------------------------------------------------------- run

function panel(title, cfg) {
  const answer = el('output', { class: 'answer', 'aria-live': 'polite', 'aria-label': `${title} answer` });
  const status = el('p', { class: 'status', role: 'status' }, 'waiting for the server…');
  const details = el('div', { class: 'details' });
  const root = el('article', { class: 'result', 'aria-label': title },
    el('h3', { text: title }),
    el('p', { class: 'cfg', text: `${cfg.model}, ${cfg.frames} frames x ${cfg.tokens_per_frame} tokens/frame, planned ${si(cfg.cost_flops)} FLOPs, predicted error ${cfg.predicted_error.toFixed(2)}` }),
    el('p', { class: 'label', text: 'Answer' }), answer, status, details);
  return { root, answer, status, details };
}

function flopsTable(planned, usage) {
  const m = usage.measured_flops;
  const names = [['vision', 'vision tower'], ['projector', 'projector'], ['lm_prefill', 'LM prefill'], ['lm_decode', 'LM decode']];
  // Vision features the server's video cache supplied are neither run nor charged.
  const cached = usage.cache && usage.cache.vision;
  const rows = names.map(([k, label]) => {
    if (cached && (k === 'vision' || k === 'projector')) return [`${label} (cached)`, '0', si(m[k]), '-'];
    const t = planned ? planned[k] : NaN;
    return [label, si(t), si(m[k]), t > 0 ? (m[k] / t).toFixed(3) : '-'];
  });
  rows.push(['total', si(usage.theoretical_flops), si(m.total), (m.total / usage.theoretical_flops).toFixed(3)]);
  return table('FLOPs by component: theoretical (the plan\'s price) and measured (counted by the engine)',
    ['component', 'theoretical', 'measured', 'measured / theoretical'], rows, 'flops');
}

function timeTable(usage, wall, firstToken) {
  const t = usage.timings;
  return table('Time per stage', ['stage', 'time'], [
    ['video decode', secs(t.video_decode_s)],
    ['vision tower', secs(t.vision_s)],
    ['LM prefill', secs(t.prefill_s)],
    ['LM decode', secs(t.decode_s)],
    ['first token (browser)', secs(firstToken)],
    ['total (browser)', secs(wall)],
  ], 'times');
}

async function runOne(videoUrl, r, cfg, p, title, signal) {
  const ui = panel(title, cfg);
  $('results').append(ui.root);
  const body = {
    model: cfg.model,
    frames: cfg.frames,
    tokens_per_frame: cfg.tokens_per_frame,
    budget_flops: budget(),
    task: r.task,
    max_tokens: r.max_tokens,
    stream: true,
    messages: [{ role: 'user', content: [{ type: 'video_url', video_url: { url: videoUrl } }, { type: 'text', text: r.prompt }] }],
  };
  // Answer choices: the answer is exactly one of them (vLLM's guided_choice).
  const choices = $('choices').value.split(',').map((c) => c.trim()).filter(Boolean);
  if (choices.length) body.guided_choice = choices;
  const t0 = performance.now();
  let first = null;
  let last = null;
  try {
    await stream('/v1/chat/completions', body, (chunk) => {
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (first === null) first = (performance.now() - t0) / 1000;
        ui.answer.textContent += delta.content;
        ui.status.textContent = 'streaming…';
      }
      if (chunk.usage) last = chunk;
    }, signal);
    if (!last) throw new ApiError(200, 'stream', 'the stream ended without a final chunk');
    const wall = (performance.now() - t0) / 1000;
    const c = last.usage.cache || {};
    const reused = [c.frames && 'decoded frames', c.vision && 'vision features'].filter(Boolean);
    ui.status.textContent = `done (${last.choices[0].finish_reason}), ${last.usage.completion_tokens} tokens`
      + (reused.length ? `; ${reused.join(' and ')} from the video cache` : '');
    ui.status.className = 'status ok';
    ui.details.replaceChildren(flopsTable(p.cost_by_component, last.usage), timeTable(last.usage, wall, first));
    ui.root.classList.add('done');
  } catch (e) {
    ui.status.textContent = e.name === 'AbortError' ? 'stopped (charged the work done)' : (e instanceof ApiError ? e.describe() : String(e));
    ui.status.className = 'status bad';
    if (e.name !== 'AbortError') throw e;
  }
}

async function run() {
  $('run-error').textContent = '';
  if (!getKey('tenant')) {
    $('run-error').textContent = 'Enter a tenant API key first.';
    return;
  }
  if (!state.video) {
    $('run-error').textContent = 'Choose a video first (drop one, choose a file or pick a suite video).';
    return;
  }
  const r = request();
  if (!r.prompt) {
    $('run-error').textContent = 'Type a question or a prompt first.';
    return;
  }
  const p = state.plan;
  if (!p) {
    $('run-error').textContent = 'No plan fits this budget: move the slider.';
    return;
  }
  const runs = [{ title: 'Plan', cfg: p, p }];
  if ($('side-by-side').checked) {
    const n = naivePick(state.candidates || [], budget());
    if (!n) {
      $('run-error').textContent = 'No naive configuration fits this budget.';
      return;
    }
    try {
      const np = await call('tenant', 'POST', '/v1/plan', {
        ...r, budget: budget(), model: n.model, frames: n.frames, tokens_per_frame: n.tokens_per_frame,
      });
      runs.push({ title: 'Naive', cfg: np, p: np });
    } catch (e) {
      $('run-error').textContent = e instanceof ApiError ? e.describe() : String(e);
      return;
    }
  }
  const ctl = new AbortController();
  state.running = ctl;
  $('run').disabled = true;
  $('stop').disabled = false;
  $('results').replaceChildren();
  $('results').classList.toggle('two', runs.length > 1);
  try {
    const url = await dataUrl(state.video.blob);
    const results = await Promise.allSettled(runs.map((x) => runOne(url, r, x.cfg, x.p, x.title, ctl.signal)));
    const failed = results.find((x) => x.status === 'rejected');
    if (failed) $('run-error').textContent = failed.reason instanceof ApiError ? failed.reason.describe() : String(failed.reason);
  } finally {
    state.running = null;
    $('run').disabled = false;
    $('stop').disabled = true;
  }
}

// ---------------------------------------------------------------- page

export function start() {
  $('tenant-key-form').addEventListener('submit', useKey);
  $('tenant-key-forget').addEventListener('click', () => {
    setKey('tenant', '');
    $('tenant-key-status').textContent = 'Key forgotten.';
    $('tenant-key-status').className = 'status';
  });
  $('budget').addEventListener('input', () => {
    $('budget').setAttribute('aria-valuetext', `${si(budget())} FLOPs`);
    replan();
  });
  $('task').addEventListener('change', () => replan(0));
  $('question').addEventListener('input', () => {
    showExpected();
    replan(300);
  });
  $('max-tokens').addEventListener('change', () => replan(0));
  $('sample').addEventListener('change', pickSample);
  $('side-by-side').addEventListener('change', () => drawFrontier(state.plan));
  $('run').addEventListener('click', run);
  $('stop').addEventListener('click', () => state.running && state.running.abort());
  wireDrop();
  $('budget-value').textContent = si(budget());
  loadSamples();
  loadModels();
}

export function shown() {
  loadModels();
}
