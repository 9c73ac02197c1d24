// @ts-check
// CST's admin page: sign in, the instances (kept current by GET /api/events), logs, the key pool,
// the usage against budgets (polled: there is no event per request) and the desired file with its
// place in git. Plain DOM, no framework: every text goes in through textContent. Each view is a
// module of views/; this one wires them: the routes, the event stream, the language.
import { ApiError, failureText, json, session } from './api.js';
import { $, byId } from './dom.js';
import { lang, setLang, translate } from './i18n.js';
import { copy } from './messages.js';
import { state } from './state.js';
import { listen, relabelLive, stopStream } from './stream.js';
import { later } from './timers.js';
import { loadDesired, renderFile, showFile } from './views/file.js';
import {
  loadInstances, onInstanceEvent, note, onListed, relabelInstances, suggestPort, tickUptimes, wireInstances,
} from './views/instances.js';
import { fillLogChoices, relabelLogs, showLogs, stopLogs, wireLogs } from './views/logs.js';
import { loadPool, relabelPool, renderPool, wirePool } from './views/pool.js';
import { enter, onSession, showSignIn, signOut, waitToRetry, wireSignIn } from './views/signin.js';
import { loadUsage, renderUsage, showUsage, startUsage, stopUsage, wireUsage } from './views/usage.js';

const VIEWS = ['instances', 'logs', 'pool', 'usage', 'file'];

/** @param {import('./api.js').ServerEvent} message */
function onEvent({ event, data }) {
  if (event === 'reset') {
    loadInstances();
    loadPool();
    loadDesired();
    loadUsage();
  } else if (event === 'pool') {
    renderPool(/** @type {import('./api.js').Pool} */ (data));
  } else if (event === 'instance') {
    const { at, id, change, detail } = /** @type {import('./views/instances.js').Activity} */ (data);
    onInstanceEvent({ at, id, change, detail });
  } else if (event === 'disk') {  // a walk of the data dirs changed a figure
    later(loadInstances);
  } else if (event === 'file') {
    const file = /** @type {{valid: boolean, problems: {text: string}[]}} */ (data);
    note({ at: new Date().toISOString(), id: '', change: file.valid ? 'file' : 'invalid',
      detail: file.problems.map((p) => p.text).join('; ') });
    later(loadInstances);
    later(loadDesired);
  } else if (event === 'reconcile' || event === 'git' || event === 'rollout') {  // git: a commit, a merge, a push, a problem
    later(loadDesired);
  }
}

// -- views and language

function route() {
  if (!session.key) return;
  const [name, arg = ''] = decodeURIComponent(location.hash.slice(1)).split('/');
  const view = VIEWS.includes(name) ? name : 'instances';
  for (const each of VIEWS) $(`view-${each}`).hidden = each !== view;
  for (const link of $('tabs').querySelectorAll('a')) {
    if (link.dataset.view === view) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  if (view !== 'logs') stopLogs();
  if (view === 'logs') showLogs(arg);
  if (view === 'usage') showUsage();
  if (view === 'file') showFile(arg);
}

function relabel() {
  translate();
  relabelInstances();
  relabelPool();
  renderUsage();
  renderFile();
  relabelLive();
  relabelLogs();
}

/** @param {import('./api.js').Status} status  signed in */
function start(status) {
  state.archiveDir = status.daemon.archiveDir;
  state.status = status;
  route();
  listen(onEvent);
  suggestPort();
  startUsage();
}

function stop() {  // signed out
  stopStream();
  stopLogs();
  stopUsage();
  for (const view of VIEWS) $(`view-${view}`).hidden = true;
}

function main() {
  const language = byId('lang', HTMLSelectElement);
  language.value = lang();
  translate();
  language.addEventListener('change', () => { setLang(language.value); relabel(); });
  onSession(start, stop);
  wireSignIn();
  wireInstances();
  onListed(fillLogChoices);
  wireLogs();
  wirePool();
  const secret = byId('dialog-secret-value', HTMLInputElement);
  $('dialog-copy').addEventListener('click', () => copy(secret.value, $('dialog-copy'), secret));
  window.addEventListener('hashchange', route);
  wireUsage();
  setInterval(tickUptimes, 1000);
  if (!session.key) return showSignIn();
  json('GET', 'api/status').then((status) => enter(/** @type {import('./api.js').Status} */ (status)), (error) => {
    if (!(error instanceof ApiError)) return showSignIn(failureText(error));
    signOut(error.message);
    if (error.status === 429) waitToRetry(error);
  });
}

main();
