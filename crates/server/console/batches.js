// The batches page (a tenant key): upload a JSONL file of requests and run it as a batch, watch
// the tenant's batches progress (refreshed while one is open), cancel one, read and download
// its answers and errors. Only the Files and Batch APIs.

import { call, upload, download, getKey, setKey, ApiError } from './api.js';
import { si, when, el, table } from './format.js';

const $ = (id) => document.getElementById(id);
const OPEN = new Set(['validating', 'in_progress', 'finalizing', 'cancelling']);
let timer = null;
let shownUrl = null; // the object URL of the file shown, revoked when another replaces it

function fail(e) {
  $('batches-error').textContent = e instanceof ApiError ? e.describe() : String(e);
}

function ok() {
  $('batches-error').textContent = '';
}

// The route a JSONL file's requests call: its first line's `url` (the server checks them all).
async function endpointOf(file) {
  const first = (await file.text()).split('\n').find((l) => l.trim());
  if (!first) throw new ApiError(422, 'validation', `${file.name} holds no request`);
  let line;
  try {
    line = JSON.parse(first);
  } catch (e) {
    throw new ApiError(422, 'validation', `the first line of ${file.name} is not JSON: ${e.message}`);
  }
  if (typeof line.url !== 'string') throw new ApiError(422, 'validation', `the first line of ${file.name} has no "url"`);
  return line.url;
}

async function submit(ev) {
  ev.preventDefault();
  const file = $('batch-file').files[0];
  const status = $('batch-status');
  if (!file) {
    fail(new ApiError(422, 'validation', 'Choose a JSONL file of requests first.'));
    return;
  }
  status.textContent = `Uploading ${file.name}…`;
  try {
    const endpoint = await endpointOf(file);
    const form = new FormData();
    form.append('purpose', 'batch');
    form.append('file', file, file.name);
    const f = await upload('/v1/files', form);
    const b = await call('tenant', 'POST', '/v1/batches', { input_file_id: f.id, endpoint, completion_window: '24h' });
    ok();
    status.textContent = `Batch ${b.id} created: ${b.request_counts.total} requests to ${endpoint}.`;
    $('batch-file').value = '';
    refresh();
  } catch (e) {
    status.textContent = '';
    fail(e);
  }
}

// What a line answered: the text of a chat, completion, caption or answer, else the error.
function answerOf(line) {
  const body = line.response ? line.response.body : null;
  if (line.error) return `${line.error.code}: ${line.error.message}`;
  if (!body) return '-';
  const c = body.choices && body.choices[0];
  if (c && c.message) return c.message.content ?? JSON.stringify(c.message.tool_calls);
  if (c && typeof c.text === 'string') return c.text;
  return typeof body.text === 'string' ? body.text : JSON.stringify(body);
}

async function show(b, fileId, kind) {
  const view = $('batch-file-view');
  try {
    const blob = await download(`/v1/files/${fileId}/content`);
    const lines = (await blob.text()).split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l));
    ok();
    const name = `${b.id}_${kind}.jsonl`;
    if (shownUrl) URL.revokeObjectURL(shownUrl);
    shownUrl = URL.createObjectURL(blob);
    const link = el('a', { href: shownUrl, download: name, text: `Download ${name}` });
    $('bf-title').textContent = kind === 'output' ? `Answers of ${b.id}` : `Errors of ${b.id}`;
    $('batch-download').replaceChildren(link);
    const rows = lines.map((l) => {
      const body = l.response && l.response.body;
      const usage = body && body.usage;
      return [
        l.custom_id,
        l.response ? String(l.response.status_code) : '-',
        answerOf(l),
        usage && usage.measured_flops ? si(usage.measured_flops.total) : '-',
      ];
    });
    const count = lines.length === 1 ? '1 line' : `${lines.length} lines`;
    $('batch-lines').replaceChildren(table(`${count}, in input order`,
      ['Request', 'Status', 'Answer', 'FLOPs'], rows));
    view.hidden = false;
  } catch (e) {
    fail(e);
  }
}

async function cancel(b) {
  try {
    await call('tenant', 'POST', `/v1/batches/${b.id}/cancel`, {});
    ok();
    refresh();
  } catch (e) {
    fail(e);
  }
}

function row(b) {
  const c = b.request_counts;
  const done = c.completed + c.failed;
  const actions = el('div', { class: 'actions' },
    OPEN.has(b.status) && b.status !== 'cancelling'
      ? el('button', { type: 'button', class: 'secondary cancel', onclick: () => cancel(b), 'aria-label': `Cancel batch ${b.id}` }, 'Cancel')
      : null,
    b.output_file_id
      ? el('button', { type: 'button', class: 'output', onclick: () => show(b, b.output_file_id, 'output'), 'aria-label': `Show the answers of batch ${b.id}` }, 'Answers')
      : null,
    b.error_file_id
      ? el('button', { type: 'button', class: 'secondary errors', onclick: () => show(b, b.error_file_id, 'error'), 'aria-label': `Show the errors of batch ${b.id}` }, 'Errors')
      : null);
  return [
    b.id,
    when(b.created_at),
    b.endpoint,
    b.status,
    el('span', {},
      el('meter', { min: 0, max: Math.max(c.total, 1), value: done, 'aria-label': `${b.id}: ${done} of ${c.total} answered` }),
      ` ${done}/${c.total} answered, ${c.failed} failed`),
    b.usage ? String(b.usage.total_tokens) : '-',
    si(b.usage ? b.usage.measured_flops : null),
    actions,
  ];
}

async function refresh() {
  clearTimeout(timer);
  if (!getKey('tenant')) {
    $('batch-list').replaceChildren(el('p', { text: 'Enter a tenant key to see its batches.' }));
    return;
  }
  try {
    const { data } = await call('tenant', 'GET', '/v1/batches?limit=50');
    ok();
    $('batch-list').replaceChildren(data.length
      ? table('Newest first', ['Batch', 'Created', 'Route', 'Status', 'Progress', 'Tokens', 'FLOPs', ''], data.map(row))
      : el('p', { text: 'No batch yet.' }));
    if (data.some((b) => OPEN.has(b.status)) && !$('page-batches').hidden) {
      timer = setTimeout(refresh, 1500);
    }
  } catch (e) {
    fail(e);
  }
}

export function start() {
  $('batch-key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const v = $('batch-key').value.trim();
    if (v) setKey('tenant', v);
    $('batch-key').value = '';
    refresh();
  });
  $('batch-form').addEventListener('submit', submit);
  $('batches-refresh').addEventListener('click', refresh);
  refresh();
}

export function shown() {
  refresh();
}
