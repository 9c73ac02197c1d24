// @ts-check
// The desired file view: the file read-only with its lines numbered, what the last reconcile pass
// did, the file's problems, and its place in git (git.js). #file/<id> or #file/L<n> highlights
// an instance's lines or one line.
import { json } from '../api.js';
import { $, el } from '../dom.js';
import { stamp } from '../format.js';
import { t } from '../i18n.js';
import { handle } from '../messages.js';
import { state } from '../state.js';
import { renderGit } from './git.js';
import { fillFileLink } from './instances.js';

/**
 * @typedef {import('../api.js').Desired} Desired
 * @typedef {import('../api.js').Status} Status
 */

const view = {
  seq: 0,
  focus: '',            // what the view highlights: an instance id or L<line>
  scrollToFocus: false, // the view moves to what it highlights once, not on every update
};

export async function loadDesired() {
  const seq = ++view.seq;
  try {
    const [desired, status] = await Promise.all([json('GET', 'api/desired'), json('GET', 'api/status')]);
    if (seq !== view.seq) return;  // an older answer never overwrites a newer one
    state.desired = /** @type {Desired} */ (desired);
    state.status = /** @type {Status} */ (status);
    renderFile();
    for (const row of state.rows.values()) fillFileLink(row);
  } catch (error) {
    handle(error);
  }
}

export function renderFile() {
  const { desired, status } = state;
  if (!desired || !status) return;
  $('file-path').textContent = desired.path;
  $('file-valid').textContent = t(desired.valid ? 'file.valid' : 'file.invalid');
  $('file-valid').className = `badge s-${desired.valid ? 'ok' : 'error'}`;
  const run = status.reconcile;
  $('file-run').textContent = run.lastRun
    ? `${stamp(run.lastRun)} · ${t('file.took', { ms: run.durationMs })} · ${t('file.recap', run.recap)}`
    : t('file.never');
  const results = run.results.map((r) => el('li', {}, el('code', {}, r.id), ` ${r.outcome}${r.detail ? `: ${r.detail}` : ''}`));
  if (run.failure) results.unshift(el('li', {}, t('file.passFailed', { reason: run.failure })));
  if (run.rollout) results.unshift(el('li', { class: 'warn' }, t('file.rolloutHalted', run.rollout)));
  $('file-results').replaceChildren(...(results.length ? results : [el('li', {}, t('file.nothing'))]));
  const problems = status.file.problems;
  $('file-problems-box').hidden = problems.length === 0;
  $('file-problems').replaceChildren(...problems.map((p) => el('li', {},
    el('a', { href: `#file/L${p.line}` }, t('file.line', { n: p.line })),
    ` ${p.path ? `${p.path}: ` : ''}${p.message}`)));
  renderGit(desired.git);
  const bad = new Set(problems.map((p) => p.line));
  let [from, to] = [0, -1];
  const span = desired.instances[view.focus];
  if (span) [from, to] = [span.from, span.to];
  else if (/^L\d+$/.test(view.focus)) from = to = Number(view.focus.slice(1));
  const lines = desired.text.replace(/\n$/, '').split('\n');
  $('file-text').replaceChildren(...lines.map((line, index) => {
    const n = index + 1;
    const marks = [bad.has(n) ? 'bad' : '', n >= from && n <= to ? 'focus' : ''].join(' ').trim();
    return el('div', { class: `line ${marks}`, id: `L${n}` },
      el('span', { class: 'ln' }, String(n)), el('span', {}, line));
  }));
  if (from && view.scrollToFocus && !$('view-file').hidden) {
    document.getElementById(`L${from}`)?.scrollIntoView({ block: 'center' });
    view.scrollToFocus = false;
  }
}

/** @param {string} focus  the view shown for #file/<focus>: drawn from what it has, then read again */
export function showFile(focus) {
  view.focus = focus;
  view.scrollToFocus = true;
  renderFile();
  loadDesired();
}
