// Entry point: shows the page named by the URL's fragment (#playground, #batches, #tenants) and the
// server's health. Each page module owns its section of index.html.

import * as playground from './playground.js';
import * as batches from './batches.js';
import * as tenants from './tenants.js';

const pages = { playground, batches, tenants };
const started = new Set();

function show() {
  const name = (location.hash || '#playground').slice(1);
  const current = pages[name] ? name : 'playground';
  for (const p of Object.keys(pages)) {
    document.getElementById(`page-${p}`).hidden = p !== current;
    const link = document.getElementById(`nav-${p}`);
    if (p === current) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  if (!started.has(current)) {
    started.add(current);
    pages[current].start();
  } else {
    pages[current].shown();
  }
  document.title = `vvlm console: ${current}`;
}

async function health() {
  const out = document.getElementById('health');
  try {
    const r = await fetch('/health', { cache: 'no-store' });
    const body = await r.json();
    if (r.ok) {
      out.textContent = `server ready: ${body.models.join(', ')}`;
      out.className = 'health ok';
    } else {
      out.textContent = `server not ready: ${body.error ? body.error.message : r.status}`;
      out.className = 'health bad';
      setTimeout(health, 2000);
    }
  } catch (e) {
    out.textContent = 'server unreachable';
    out.className = 'health bad';
    setTimeout(health, 5000);
  }
}

window.addEventListener('hashchange', show);
show();
health();
