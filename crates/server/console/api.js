// The console's only way to the server: the documented HTTP API. Keys live in sessionStorage
// (gone when the tab closes) and travel only in the Authorization header.

const KEYS = { tenant: 'vvlm.tenantKey', admin: 'vvlm.adminKey' };

export function getKey(kind) {
  return sessionStorage.getItem(KEYS[kind]) || '';
}

export function setKey(kind, value) {
  if (value) sessionStorage.setItem(KEYS[kind], value);
  else sessionStorage.removeItem(KEYS[kind]);
}

/** An API error with the server's status, type and message. */
export class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }

  /** What the user reads. */
  describe() {
    if (this.status === 401) {
      return `The server refused the key (401 unauthorized): ${this.message}. Check the key and save it again.`;
    }
    if (this.status === 0) return `The server could not be reached: ${this.message}`;
    return `${this.status} ${this.type}: ${this.message}`;
  }
}

async function errorOf(resp) {
  let type = 'error';
  let message = resp.statusText;
  try {
    const body = await resp.json();
    if (body && body.error) {
      type = body.error.type || type;
      message = body.error.message || message;
    }
  } catch (_) {
    // not JSON: keep the status text
  }
  return new ApiError(resp.status, type, message);
}

function headers(kind, json) {
  const h = {};
  const key = getKey(kind);
  if (key) h.Authorization = `Bearer ${key}`;
  if (json) h['Content-Type'] = 'application/json';
  return h;
}

/** Fetches with the tenant's or the admin's key; resolves to a 2xx response, else throws. */
async function send(kind, method, path, body, json, signal) {
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers: headers(kind, json),
      body,
      signal,
      cache: 'no-store',
      credentials: 'omit',
    });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'network', e.message);
  }
  if (!resp.ok) throw await errorOf(resp);
  return resp;
}

/** Calls the API with the tenant's or the admin's key; resolves to the JSON answer. */
export async function call(kind, method, path, body, signal) {
  const json = body !== undefined;
  const resp = await send(kind, method, path, json ? JSON.stringify(body) : undefined, json, signal);
  if (resp.status === 204) return null;
  return resp.json();
}

/** POSTs a multipart form (a file upload) with the tenant's key; resolves to the JSON answer. */
export async function upload(path, form) {
  return (await send('tenant', 'POST', path, form, false)).json();
}

/** GETs a stored file's bytes with the tenant's key, as a Blob. */
export async function download(path) {
  return (await send('tenant', 'GET', path, undefined, false)).blob();
}

/**
 * POSTs a streaming chat completion and calls onChunk for every SSE `data:` payload (parsed
 * JSON) until `[DONE]`. EventSource cannot POST or send headers, so the stream is read from
 * fetch's body.
 */
export async function stream(path, body, onChunk, signal) {
  let resp;
  try {
    resp = await fetch(path, {
      method: 'POST',
      headers: headers('tenant', true),
      body: JSON.stringify(body),
      signal,
      cache: 'no-store',
      credentials: 'omit',
    });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'network', e.message);
  }
  if (!resp.ok) throw await errorOf(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut).replace(/^\r?\n\r?\n/, '');
      const data = block.split(/\r?\n/)
        .filter((l) => l.startsWith('data:'))
        .map((l) => l.slice(5).replace(/^ /, ''))
        .join('\n');
      if (!data) continue; // keep-alive comment
      if (data === '[DONE]') return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(200, chunk.error.type, chunk.error.message);
      onChunk(chunk);
    }
  }
}

/** Reads a File or Blob as a data: URL (what the JSON APIs take). */
export function dataUrl(blob) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(blob);
  });
}
