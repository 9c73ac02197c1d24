// CST's admin page: sign in, the instances (kept current by GET /api/events), logs, the key pool,
// the usage against budgets (polled: there is no event per request) and the desired file with its
// place in git. Plain DOM, no framework: every text goes in through textContent.
import { ApiError, call, json, serverEvents, session, textChunks } from './api.js';
import { lang, setLang, t, translate } from './i18n.js';
import { DAYS, addDays, count, drawChart, usageCell, usageRows, wallTime } from './usage.js';

const $ = (id) => document.getElementById(id);
const VIEWS = ['instances', 'logs', 'pool', 'usage', 'file'];
const COLUMNS = ['id', 'port', 'desired', 'status', 'uptime', 'restarts', 'usage', 'failure', 'dataDir', 'actions'];
const STALL_MS = 45000;  // the server comments every 15 s: this long without a byte means the stream is dead
const USAGE_MS = 15000;  // GET /api/usage this often while signed in
// What CST observes of an instance, for rows from a server that says only the seed's status
const OBSERVED_OF_STATUS = { online: 'running', stopped: 'stopped', errored: 'errored' };
// The summary's and the state filter's groups: every way of failing to run counts as errored
const GROUP_OF_OBSERVED = { running: 'running', parked: 'parked', stopped: 'stopped', crashed: 'errored',
  'port-taken': 'errored', errored: 'errored' };
const GROUPS = ['running', 'parked', 'stopped', 'errored'];

const state = {
  rows: new Map(),     // instance id -> {id, data, tr, cells, badge, ..., pending, flash, drawnFrom}
  search: '',          // the instances shown: ids or ports containing this, in this group (or 'all')
  group: 'all',
  fetchedAt: 0,        // when the rows' uptimes were measured
  listSeq: 0,
  archiveDir: '',
  pool: null,
  desired: null,       // GET /api/desired (with its `git`)
  desiredSeq: 0,
  gitWarnings: '',     // the warnings shown, so an unchanged set is not announced again
  status: null,        // GET /api/status
  focus: '',           // what the file view highlights: an instance id or L<line>
  activity: [],
  live: null,
  stream: null,        // the event stream's {stopped, controller}
  logController: null,
  logState: '',
  logLength: 0,
  scrollToFocus: false, // the file view moves to what it highlights once, not on every update
  usage: null,         // GET /api/usage
  usageAt: 0,          // when it was fetched
  usageError: '',
  history: null,       // GET /api/usage?from=&to=: the chart's days
  usageTimer: null,
  usageSeq: 0,
  chartWidth: 0,
};

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === 'class') node.className = value;
    else if (name === 'dataset') Object.assign(node.dataset, value);
    else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const locale = () => (lang() === 'zh' ? 'zh-CN' : 'en-GB');
const clock = (iso) => (iso ? new Date(iso).toLocaleTimeString(locale(), { hour12: false }) : '');
const stamp = (iso) => (iso ? new Date(iso).toLocaleString(locale(), {
  month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false,
}) : '');
const moment = (iso) => (iso ? new Date(iso).toLocaleString(locale(), {
  year: 'numeric', month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit', hour12: false,
}) : '');
const money = (value) => (typeof value === 'number' ? `¥${value.toFixed(2)}` : '—');

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
function size(bytes) {  // 182 MiB, 1.4 GiB
  if (typeof bytes !== 'number') return '—';
  let value = bytes;
  let unit = 0;
  for (; value >= 1024 && unit < UNITS.length - 1; unit += 1) value /= 1024;
  return `${unit && value < 10 ? value.toFixed(1) : Math.round(value)} ${UNITS[unit]}`;
}

function setText(node, text) {  // a write that changes nothing would still make the page lay out again
  if (node.textContent !== text) node.textContent = text;
}

function period(seconds) {  // settings.git.every: 1s, 30s, 1m, 1m 30s, 2h
  if (seconds < 60) return `${Number(seconds.toFixed(3))}s`;
  return duration(seconds).replace(/ 0[smh]$/, '');
}

function duration(seconds) {
  const s = Math.floor(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

// -- messages

function toast(text, kind = 'info') {
  const item = el('div', { class: `toast ${kind}`, role: kind === 'error' ? 'alert' : 'status' },
    el('span', {}, text),
    el('button', { type: 'button', class: 'link', 'aria-label': t('close'), onclick: () => item.remove() }, '×'));
  $('toasts').append(item);
  setTimeout(() => item.remove(), kind === 'error' ? 15000 : 8000);
  return item;
}

function handle(error) {
  if (error instanceof ApiError && error.status === 401) return signOut(error.message);
  if (error instanceof ApiError && error.status === 429) {
    return toast(t('err.wait', { message: error.message, s: error.retryAfter || 1 }), 'error');
  }
  if (error instanceof ApiError) return toast(error.message, 'error');
  if (error.name !== 'AbortError') toast(t('err.network', { reason: error.message }), 'error');
}

async function dialog({ title, text, ok = t('ok'), cancel = true, secret = '', danger = false }) {
  const box = $('dialog');
  while (box.open) await new Promise((resolve) => box.addEventListener('close', resolve, { once: true }));
  $('dialog-title').textContent = title;
  $('dialog-text').textContent = text;
  $('dialog-secret').hidden = !secret;
  $('dialog-secret-value').value = secret;
  $('dialog-ok').textContent = ok;
  $('dialog-ok').className = danger ? 'destroy' : 'primary';
  $('dialog-cancel').hidden = !cancel;
  return new Promise((resolve) => {
    let answer = false;
    const listening = new AbortController();
    $('dialog-ok').addEventListener('click', () => { answer = true; box.close(); }, { signal: listening.signal });
    $('dialog-cancel').addEventListener('click', () => box.close(), { signal: listening.signal });
    box.addEventListener('close', () => {
      listening.abort();
      $('dialog-secret-value').value = '';  // a password is shown once
      resolve(answer);
    }, { once: true });
    box.showModal();
    (secret ? $('dialog-copy') : cancel ? $('dialog-cancel') : $('dialog-ok')).focus();
  });
}

async function copy(text, button, field = null) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {  // no clipboard API outside a secure context (http to another host): select and copy
    const input = field || el('input', { value: text });
    if (!field) document.body.append(input);
    input.select();
    document.execCommand('copy');
    if (!field) input.remove();
  }
  button.textContent = t('copied');
  setTimeout(() => { button.textContent = t('copy'); }, 1500);
}

// -- signing in and out

let waitTimer = null;

function showSignIn(message = '') {
  stopStream();
  stopLogs();
  stopUsage();
  $('signin').hidden = false;
  for (const id of ['tabs', 'signout', 'live']) $(id).hidden = true;
  for (const view of VIEWS) $(`view-${view}`).hidden = true;
  $('signin-error').textContent = message;
  $('key').focus();
}

function signOut(reason = '') {
  session.key = null;
  showSignIn(reason ? t('signin.out', { reason }) : '');
}

async function signIn(event) {
  event.preventDefault();
  const key = $('key').value;
  $('signin-error').textContent = '';
  try {
    const status = await json('GET', 'api/status', { key });
    session.key = key;
    $('key').value = '';
    enter(status);
  } catch (error) {
    if (error instanceof ApiError && error.status === 429) return waitToRetry(error);
    $('signin-error').textContent = error instanceof ApiError
      ? error.message : t('err.network', { reason: error.message });
  }
}

// the API's brute-force limit: say so, count down, and let the button work again when it may
function waitToRetry(error) {
  const until = Date.now() + Math.max(error.retryAfter, 1) * 1000;
  const button = $('signin-submit');
  button.disabled = true;
  const tick = () => {
    const left = Math.ceil((until - Date.now()) / 1000);
    if (left <= 0) {
      clearInterval(waitTimer);
      button.disabled = false;
      $('signin-error').textContent = '';
      return;
    }
    $('signin-error').textContent = `${error.message} ${t('signin.wait', { s: left })}`;
  };
  clearInterval(waitTimer);
  waitTimer = setInterval(tick, 250);
  tick();
}

function enter(status) {
  $('signin').hidden = true;
  for (const id of ['tabs', 'signout', 'live']) $(id).hidden = false;
  state.archiveDir = status.daemon.archiveDir;
  state.status = status;
  route();
  listen();
  suggestPort();
  startUsage();
}

// -- the event stream: fetch() so the key travels in a header, reconnecting with Last-Event-ID

function setLive(on) {
  state.live = on;
  $('live').textContent = t(on ? 'live.on' : 'live.off');
  $('live').className = `live ${on ? 'on' : 'off'}`;
}

async function listen() {
  stopStream();
  const stream = { stopped: false, controller: null };
  state.stream = stream;
  let lastId = null;
  let delay = 1000;
  setLive(false);
  while (!stream.stopped) {
    const controller = new AbortController();
    stream.controller = controller;
    let timer = null;
    const arm = () => { clearTimeout(timer); timer = setTimeout(() => controller.abort(), STALL_MS); };
    try {
      arm();
      const response = await call('GET', 'api/events', {
        signal: controller.signal, extraHeaders: lastId ? { 'Last-Event-ID': lastId } : {},
      });
      setLive(true);
      delay = 1000;
      for await (const event of serverEvents(response)) {
        arm();
        if (event.id) lastId = event.id;
        onEvent(event);
      }
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        clearTimeout(timer);
        if (!stream.stopped) signOut(error.message);
        return;
      }
      if (error instanceof ApiError && error.status === 429) delay = Math.max(delay, error.retryAfter * 1000);
    } finally {
      clearTimeout(timer);
    }
    if (stream.stopped) return;
    setLive(false);
    await sleep(delay);
    delay = Math.min(delay * 2, 15000);
  }
}

function stopStream() {
  if (!state.stream) return;
  state.stream.stopped = true;
  state.stream.controller?.abort();
  state.stream = null;
}

function onEvent({ event, data }) {
  if (event === 'reset') {
    loadInstances();
    loadPool();
    loadDesired();
    loadUsage();
  } else if (event === 'pool') {
    renderPool(data);
  } else if (event === 'instance') {
    note({ at: data.at, id: data.id, change: data.change, detail: data.detail });
    const row = state.rows.get(data.id);
    if (row && data.change === 'crashed') {  // shown until the list says what it is now
      row.flash = 'crashed';
      fillRow(row);
    }
    later(loadInstances);
  } else if (event === 'disk') {  // a walk of the data dirs changed a figure
    later(loadInstances);
  } else if (event === 'file') {
    note({ at: new Date().toISOString(), id: '', change: data.valid ? 'file' : 'invalid',
      detail: data.problems.map((p) => p.text).join('; ') });
    later(loadInstances);
    later(loadDesired);
  } else if (event === 'reconcile' || event === 'git' || event === 'rollout') {  // git: a commit, a merge, a push, a problem
    later(loadDesired);
  }
}

const pending = new Map();
function later(load, ms = 150) {  // a burst of events makes one request
  clearTimeout(pending.get(load));
  pending.set(load, setTimeout(load, ms));
}

// -- instances

async function loadInstances() {
  const seq = ++state.listSeq;
  try {
    const rows = await json('GET', 'api/instances');
    if (seq === state.listSeq) renderInstances(rows);  // an older answer never overwrites a newer one
  } catch (error) {
    handle(error);
  }
}

// Rows are made once and then only changed: a row whose data did not change is not touched, so a
// live update at 500 instances costs what the few changed rows cost.
function renderInstances(list) {
  state.fetchedAt = Date.now();
  const body = $('instances').tBodies[0];
  const seen = new Set();
  list.forEach((data, index) => {
    let row = state.rows.get(data.id);
    if (!row) {
      row = makeRow(data.id);
      state.rows.set(data.id, row);
    }
    row.data = data;
    row.flash = null;
    seen.add(data.id);
    fillRow(row);
    if (body.children[index] !== row.tr) body.insertBefore(row.tr, body.children[index] || null);
  });
  for (const [id, row] of state.rows) {
    if (!seen.has(id)) {
      row.tr.remove();
      state.rows.delete(id);
    }
  }
  $('instances').hidden = list.length === 0;
  $('no-instances').hidden = list.length > 0;
  renderSummary();
  applyFilter();
  fillLogChoices();
}

const observedOf = (data) => data.observed ?? OBSERVED_OF_STATUS[data.status];
const groupOf = (data) => GROUP_OF_OBSERVED[observedOf(data)] ?? 'errored';

function renderSummary() {
  const counts = Object.fromEntries(GROUPS.map((group) => [group, 0]));
  let memory = null;  // stays null from a server that does not report memory: shown as "—", not 0 B
  let disk = null;    // likewise, and before cst serve's first walk of the data dirs
  for (const { data } of state.rows.values()) {
    counts[groupOf(data)] += 1;
    if ('memory' in data) memory = (memory ?? 0) + (data.memory ?? 0);
    if (typeof data.disk === 'number') disk = (disk ?? 0) + data.disk;
  }
  for (const group of GROUPS) setText($(`sum-${group}`), count(counts[group]));
  $('sum-errored').parentElement.classList.toggle('alert', counts.errored > 0);
  setText($('sum-memory'), size(memory));
  setText($('sum-disk'), size(disk));
}

function matches(row) {
  const { search, group } = state;
  return (group === 'all' || groupOf(row.data) === group)
    && (!search || row.id.includes(search) || String(row.data.port).includes(search));
}

// Search and the state filter hide rows rather than rebuild them: typing costs a pass over the rows
function applyFilter() {
  let shown = 0;
  for (const row of state.rows.values()) {
    const hidden = !matches(row);
    if (row.tr.hidden !== hidden) row.tr.hidden = hidden;
    if (!hidden) shown += 1;
  }
  const total = state.rows.size;
  const filtering = state.search !== '' || state.group !== 'all';
  setText($('shown-count'), filtering ? t('filter.shown', { shown: count(shown), total: count(total) }) : '');
  $('no-match').hidden = !(total > 0 && shown === 0);
}

function filterBy() {
  state.search = $('instance-search').value.trim().toLowerCase();
  state.group = $('state-filter').value;
  applyFilter();
}

// A row is a clone of one built here, for the page's language: at 500 rows cloning is several
// times faster than building each element by element. Its buttons carry data-act and are answered
// by one listener on the table (onRowClick).
const rowTemplates = new Map();  // language -> <tr>

function rowTemplate() {
  if (!rowTemplates.has(lang())) {
    const tr = el('tr', {}, ...COLUMNS.map((column) => el('td', { class: `c-${column}` })));
    const cell = (column) => tr.cells[COLUMNS.indexOf(column)];
    cell('id').append(el('span', {}, el('code'), el('a', { class: 'small url', target: '_blank', rel: 'noopener' }),
      el('a', { class: 'small file-link' })));
    cell('status').append(el('span', { class: 'badge' }), el('span', { class: 'memory' }));
    // one child: at phone width the cell is a flex line of its label and this, the size under the path
    cell('dataDir').append(el('span', {}, el('span', { class: 'path' }), el('span', { class: 'disk' })));
    const button = (act, extra = {}) => el('button', { type: 'button', ...extra, dataset: { act, ...extra.dataset } });
    cell('actions').append(el('span', { class: 'actions' },
      button('toggle', { class: 'toggle' }), button('park', { class: 'park' }),
      button('restart', { class: 'restart', dataset: { i18n: 'act.restart' } }),
      el('a', { class: 'button logs', dataset: { i18n: 'act.logs' } }),
      el('details', { class: 'menu' }, el('summary', { dataset: { i18n: 'act.more' } }),
        el('div', { class: 'menu-items' },
          button('password', { dataset: { i18n: 'act.password' } }),
          button('backup', { dataset: { i18n: 'act.backup' } }),
          el('a', { class: 'in-file', dataset: { i18n: 'act.file' } }),
          button('delete', { class: 'danger', dataset: { i18n: 'act.delete' } })))));
    translate(tr);
    rowTemplates.set(lang(), tr);
  }
  return rowTemplates.get(lang());
}

function makeRow(id) {
  const tr = rowTemplate().cloneNode(true);
  tr.dataset.id = id;
  const pick = (selector) => tr.querySelector(selector);
  const row = { id, tr, cells: Object.fromEntries(COLUMNS.map((column, index) => [column, tr.cells[index]])),
    pending: null, flash: null, url: pick('.url'), fileLink: pick('.file-link'), badge: pick('.badge'), memory: pick('.memory'),
    path: pick('.path'), disk: pick('.disk'),
    toggle: pick('.toggle'), park: pick('.park'), restart: pick('.restart'), more: pick('summary') };
  pick('code').textContent = id;
  row.fileLink.href = `#file/${id}`;
  pick('.in-file').href = `#file/${id}`;
  pick('.logs').href = `#logs/${id}`;
  labelRow(row);
  return row;
}

function labelRow(row) {  // what changes only with the language, but for data-i18n (translate)
  for (const column of COLUMNS) row.cells[column].dataset.label = t(`col.${column}`);  // the phone layout's labels
  row.fileLink.title = t('act.file');
  row.memory.title = t('memory');
  row.disk.title = t('disk');
}

const ROW_ACTIONS = {
  toggle, park: parkOrWake, restart: (row) => act(row, 'restarting', 'POST', '/restart'),
  password: resetPassword, backup, delete: remove,
};

function onRowClick(event) {
  const menu = event.target.closest('.menu-items')?.closest('details');
  if (menu) menu.open = false;  // a choice made in a row's menu closes it
  const button = event.target.closest('button[data-act]');
  const row = button && state.rows.get(button.closest('tr').dataset.id);
  if (row) ROW_ACTIONS[button.dataset.act](row);
}

function onRowKey(event) {  // Escape closes a row's open menu and leaves the focus on it
  const menu = event.target.closest('details.menu[open]');
  if (event.key !== 'Escape' || !menu) return;
  menu.open = false;
  menu.querySelector('summary').focus();
}

function fillRow(row) {
  fillFileLink(row);
  const { data, cells } = row;
  const usage = usageOf(row);
  const observed = observedOf(data);
  const status = row.pending || row.flash || observed;
  // everything the row shows but its uptime, which the clock moves (see start), and its lines
  const drawnFrom = JSON.stringify([lang(), status, usage, { ...data, uptime: null }]);
  if (drawnFrom === row.drawnFrom) return;
  row.drawnFrom = drawnFrom;
  cells.port.textContent = data.port;
  setText(row.url, data.url ? data.url.replace(/^https?:\/\//, '') : '');
  if (data.url) row.url.href = data.url;
  else row.url.removeAttribute('href');
  cells.desired.textContent = t(`desired.${data.desired}`);
  row.badge.textContent = t(`status.${status}`);
  row.badge.className = `badge s-${status}`;
  row.badge.title = data.detail || '';
  row.memory.textContent = size(data.memory);
  cells.uptime.textContent = uptime(row);
  cells.restarts.textContent = data.restarts;
  cells.usage.replaceChildren(usageCell(usage));
  const failure = data.lastFailure;
  cells.failure.textContent = failure ? `${stamp(failure.at)} ${failure.reason}` : data.detail || '—';
  row.path.textContent = data.dataDir;
  row.path.title = data.dataDir;
  row.disk.textContent = size(data.disk);
  const declared = data.desired !== 'absent';
  const busy = Boolean(row.pending);
  row.toggle.textContent = t(data.desired === 'running' ? 'act.stop' : 'act.start');
  row.toggle.disabled = busy || !declared;
  // parking is on for it (parkAfter): a running instance can be parked now, a parked one woken
  const parkable = observed === 'running' && data.parkAfter !== null && data.parkAfter !== undefined;
  row.park.hidden = !(parkable || observed === 'parked');
  row.park.textContent = t(observed === 'parked' ? 'act.wake' : 'act.park');
  row.park.disabled = busy;
  row.restart.disabled = busy || data.desired !== 'running';
  row.more.classList.toggle('disabled', busy);
}

function fillFileLink(row) {  // GET /api/desired says where the instance is in the file
  const lines = state.desired?.instances?.[row.id];
  setText(row.fileLink, lines ? `desired.yaml:${lines.from}` : '');
}

// this instance's use and budget: from GET /api/usage, or from its row when that is newer
function usageOf(row) {
  const polled = state.usage?.instances?.[row.id];
  const own = row.data.usage ? { ...row.data.usage, budget: row.data.budget ?? null, left: row.data.left ?? null }
    : null;
  return (polled && (state.usageAt >= state.fetchedAt || !own)) ? polled : own || polled || null;
}

function uptime(row) {
  const { uptime: base } = row.data;
  return base === null || base === undefined ? '—' : duration(base + (Date.now() - state.fetchedAt) / 1000);
}

async function run(row, pendingStatus, method, path, body) {
  row.pending = pendingStatus;
  fillRow(row);
  try {
    return await json(method, `api/instances/${encodeURIComponent(row.id)}${path}`, { body });
  } finally {
    row.pending = null;
    if (state.rows.get(row.id) === row) fillRow(row);
    later(loadInstances, 0);
  }
}

// an action whose answer is a message: shown, as is an error
async function act(row, pendingStatus, method, path) {
  try {
    toast((await run(row, pendingStatus, method, path)).message);
  } catch (error) {
    handle(error);
  }
}

function toggle(row) {
  const stop = row.data.desired === 'running';
  return act(row, stop ? 'stopping' : 'starting', 'POST', stop ? '/stop' : '/start');
}

function parkOrWake(row) {
  const wake = observedOf(row.data) === 'parked';
  return act(row, wake ? 'waking' : 'parking', 'POST', wake ? '/wake' : '/park');
}

async function resetPassword(row) {
  const title = t('password.title', { id: row.id });
  if (!await dialog({ title, text: t('password.text'), ok: t('password.ok') })) return;
  try {
    const answer = await run(row, 'resetting', 'POST', '/reset-password');
    await dialog({ title: t('secret.password', { id: row.id }), text: t('secret.text', { id: row.id }),
      secret: answer.password, cancel: false, ok: t('close') });
  } catch (error) {
    handle(error);
  }
}

async function remove(row) {
  const text = t('delete.text', { dataDir: row.data.dataDir, archive: state.archiveDir, id: row.id });
  if (await dialog({ title: t('delete.title', { id: row.id }), text, ok: t('delete.ok'), danger: true })) {
    await act(row, 'deleting', 'DELETE', '');
  }
}

async function backup(row) {
  try {
    const response = await call('GET', `api/instances/${encodeURIComponent(row.id)}/backup`);
    const disposition = response.headers.get('Content-Disposition') || '';
    const name = /filename="([^"]+)"/.exec(disposition)?.[1] || `${row.id}.zip`;
    const url = URL.createObjectURL(await response.blob());
    const link = el('a', { href: url, download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    toast(t('backup.done', { id: row.id }));
  } catch (error) {
    handle(error);
  }
}

async function create(event) {
  event.preventDefault();
  const port = Number($('new-port').value);
  const button = $('create-submit');
  button.disabled = true;
  const busy = toast(t('create.busy', { id: `st-instance-${port}` }));
  try {
    const answer = await json('POST', 'api/instances', { body: { port } });
    later(loadInstances, 0);
    suggestPort();
    await dialog({ title: t('secret.created', { id: answer.id }), text: t('secret.text', { id: answer.id }),
      secret: answer.password, cancel: false, ok: t('close') });
  } catch (error) {
    handle(error);
  } finally {
    button.disabled = false;
    busy.remove();
  }
}

async function suggestPort() {
  try {
    $('new-port').value = (await json('GET', 'api/free-port')).port;
  } catch {
    // no suggestion: the field stays as it is and the operator types a port
  }
}

function note(entry) {
  state.activity.unshift(entry);
  state.activity.length = Math.min(state.activity.length, 50);
  renderActivity();
}

function renderActivity() {
  $('activity').replaceChildren(...state.activity.map(({ at, id, change, detail }) => el('li', {},
    el('time', { datetime: at }, clock(at)), ' ', id ? el('code', {}, id) : null, ' ',
    el('strong', { class: `c-${change}` }, t(`change.${change}`)), detail ? ` ${detail}` : null)));
  $('no-activity').hidden = state.activity.length > 0;
}

// -- logs

function fillLogChoices() {
  const select = $('log-instance');
  const chosen = select.value;
  const ids = [...state.rows.keys()];
  if ([...select.options].map((o) => o.value).join() !== ids.join()) {
    select.replaceChildren(...ids.map((id) => el('option', { value: id }, id)));
    if (ids.includes(chosen)) select.value = chosen;
  }
}

function setLogState(key) {
  state.logState = key;
  $('log-state').textContent = key ? t(key) : '';
  $('log-state').className = `badge ${key === 'logs.live' ? 's-online' : ''}`;
}

function stopLogs() {
  state.logController?.abort();
  state.logController = null;
}

async function showLogs(id) {
  if (id) {
    if (!state.rows.has(id)) await loadInstances();
    $('log-instance').value = id;
  }
  stopLogs();
  const chosen = $('log-instance').value;
  const text = $('log-text');
  text.textContent = '';
  state.logLength = 0;
  if (!chosen) return setLogState('logs.empty');
  const controller = new AbortController();
  state.logController = controller;
  const follow = $('log-follow').checked;
  const lines = Math.min(Math.max(parseInt($('log-lines').value, 10) || 0, 0), 10000);
  setLogState('logs.loading');
  try {
    const response = await call('GET',
      `api/instances/${encodeURIComponent(chosen)}/logs?tail=${lines}&follow=${follow ? 1 : 0}`,
      { signal: controller.signal });
    setLogState(follow ? 'logs.live' : 'logs.ended');
    for await (const chunk of textChunks(response)) appendLog(chunk);
    setLogState('logs.ended');
  } catch (error) {
    if (controller.signal.aborted) return;
    setLogState('logs.ended');
    handle(error);
  }
}

function appendLog(chunk) {
  const text = $('log-text');
  const atEnd = text.scrollHeight - text.scrollTop - text.clientHeight < 40;
  text.append(chunk);
  state.logLength += chunk.length;
  if (state.logLength > 2_000_000) {  // a log followed for days: keep its last megabyte
    text.textContent = text.textContent.slice(-1_000_000);
    state.logLength = text.textContent.length;
  }
  if (atEnd) text.scrollTop = text.scrollHeight;
}

// -- the key pool

async function loadPool() {
  try {
    renderPool(await json('GET', 'api/pool'));
  } catch (error) {
    handle(error);
  }
}

function proxyUrl(url) {  // a proxy on every address is reached here the way this page was
  return url ? url.replace(/\/\/(0\.0\.0\.0|\[::\])(?=[:/])/, `//${location.hostname}`) : '–';
}

function cells(values) {
  return values.map(([label, content]) => el('td', { dataset: { label: t(label) } }, content));
}

function renderPool(doc) {
  state.pool = doc;
  $('pool-off').hidden = doc.running;
  $('pool-balance').textContent = money(doc.totalBalance);
  $('pool-keys').textContent = `${doc.keys.available} / ${doc.keys.total}`;
  $('pool-url').textContent = proxyUrl(doc.url);
  const accounts = Object.entries(doc.accounts);
  $('accounts').tBodies[0].replaceChildren(...accounts.map(([name, account]) => {
    const ok = account.state === 'ok';
    const label = ok ? t(`state.ok.${account.provider}`) : t(`state.${account.state}`);
    const why = account.last_error || (account.from_cache ? t('acc.cached') : '');
    return el('tr', {}, ...cells([
      ['acc.name', name], ['acc.provider', account.provider],
      ['acc.state', el('span', {}, el('span', { class: `badge s-${account.state}` }, label), why ? ` ${why}` : '')],
      ['acc.balance', money(account.balance)], ['acc.keys', String(account.keys.length)],
      ['acc.refreshed', stamp(account.last_refresh) || '—'],
    ]));
  }));
  $('accounts').hidden = accounts.length === 0;
  $('no-accounts').hidden = accounts.length > 0 || !doc.running;
  const keys = accounts.flatMap(([name, account]) => account.keys.map((key) => ({ ...key, account: name })));
  $('keys').tBodies[0].replaceChildren(...keys.map((key) => el('tr', {}, ...cells([
    ['key.key', el('code', {}, key.key)], ['key.account', key.account],
    ['key.available',
      el('span', { class: `badge s-${key.available ? 'ok' : 'error'}` }, t(key.available ? 'yes' : 'no'))],
    ['key.balance', money(key.balance)], ['key.used', money(key.used)], ['key.requests', String(key.requests)],
    ['key.failures', String(key.failures)], ['key.cooldown', stamp(key.cooldown_until) || '—'],
  ]))));
  $('keys').hidden = keys.length === 0;
  $('no-keys').hidden = keys.length > 0 || !doc.running;
}

// -- usage against the budgets: polled, as there is no event per request

function startUsage() {
  stopUsage();
  loadUsage();
  state.usageTimer = setInterval(() => { if (!document.hidden) loadUsage(); }, USAGE_MS);
}

function stopUsage() {
  clearInterval(state.usageTimer);
  state.usageTimer = null;
  state.usageSeq += 1;  // an answer still on its way is dropped
}

async function loadUsage() {
  const seq = ++state.usageSeq;
  try {
    const usage = await json('GET', 'api/usage');
    let history = state.history;
    if (!$('view-usage').hidden || !history) {
      const to = usage.window.day;
      history = await json('GET', `api/usage?from=${addDays(to, 1 - DAYS)}&to=${to}`);
    }
    if (seq !== state.usageSeq) return;  // an older answer never overwrites a newer one
    Object.assign(state, { usage, history, usageAt: Date.now(), usageError: '' });
  } catch (error) {
    if (seq !== state.usageSeq) return;
    if (error instanceof ApiError && error.status === 401) return handle(error);
    state.usageError = error instanceof ApiError ? error.message : t('err.network', { reason: error.message });
  }
  for (const row of state.rows.values()) fillRow(row);
  renderUsage();
}

function renderUsage() {
  if ($('view-usage').hidden) return;  // drawn when shown (route): a table of 500 rows is not free
  $('usage-error').textContent = state.usageError ? t('use.unavailable', { reason: state.usageError }) : '';
  $('usage-error').hidden = !state.usageError;
  const { usage, history } = state;
  if (!usage) return;
  const { window: w } = usage;
  $('usage-window').textContent = t('use.window', { tz: w.timezone, day: w.day, dayReset: wallTime(w.resets?.day),
    monthReset: wallTime(w.resets?.month), at: clock(new Date(state.usageAt).toISOString()) });
  const rows = usageRows(usage);
  $('usage-table').tBodies[0].replaceChildren(...rows);
  $('usage-table').hidden = rows.length === 0;
  $('no-usage').hidden = rows.length > 0;
  drawUsageChart();
}

function drawUsageChart() {
  const plot = $('chart-plot');
  if (!state.history || !state.usage || $('view-usage').hidden || !plot.clientWidth) return;
  state.chartWidth = plot.clientWidth;
  drawChart({ plot, legend: $('chart-legend'), table: $('chart-table'), history: state.history,
    ids: Object.keys(state.usage.instances || {}), width: plot.clientWidth });
}

// -- the desired file

async function loadDesired() {
  const seq = ++state.desiredSeq;
  try {
    const [desired, status] = await Promise.all([json('GET', 'api/desired'), json('GET', 'api/status')]);
    if (seq !== state.desiredSeq) return;  // an older answer never overwrites a newer one
    state.desired = desired;
    state.status = status;
    renderFile();
    for (const row of state.rows.values()) fillFileLink(row);
  } catch (error) {
    handle(error);
  }
}

function renderFile() {
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
  const span = desired.instances[state.focus];
  if (span) [from, to] = [span.from, span.to];
  else if (/^L\d+$/.test(state.focus)) from = to = Number(state.focus.slice(1));
  const lines = desired.text.replace(/\n$/, '').split('\n');
  $('file-text').replaceChildren(...lines.map((line, index) => {
    const n = index + 1;
    const marks = [bad.has(n) ? 'bad' : '', n >= from && n <= to ? 'focus' : ''].join(' ').trim();
    return el('div', { class: `line ${marks}`, id: `L${n}` },
      el('span', { class: 'ln' }, String(n)), el('span', {}, line));
  }));
  if (from && state.scrollToFocus && !$('view-file').hidden) {
    $(`L${from}`)?.scrollIntoView({ block: 'center' });
    state.scrollToFocus = false;
  }
}

// -- the file in git: the commit that runs, the last commits, the branch followed, what went wrong

function commitLine(commit) {
  return el('span', { class: 'commit' },
    el('span', { class: 'commit-what' }, el('code', { title: commit.hash }, commit.short), ' ',
      el('span', { class: 'commit-message' }, commit.message)),
    el('span', { class: 'commit-meta' }, `${commit.author} · `,
      el('time', { datetime: commit.when, title: commit.when }, moment(commit.when))));
}

// what is wrong, each with the server's own message (in English) under a label in the page's language
function gitWarnings(git) {
  const warnings = [];
  if (git.problem) warnings.push({ label: t('git.warn.problem'), message: git.problem });
  const sync = git.lastSync?.problem;
  if (sync && sync.message !== git.problem) {
    const key = `git.warn.sync.${sync.kind}`;
    warnings.push({ label: t(key) === key ? t('git.warn.sync') : t(key), message: sync.message,
      when: t('git.warn.tried', { at: stamp(git.lastSync.at) }) });
  }
  const commit = git.lastCommit;
  if (commit && commit.kind !== 'committed') {
    warnings.push({ label: t('git.warn.commit'), message: commit.message,
      when: t('git.warn.edit', { at: stamp(commit.at) }) });
  }
  return warnings;
}

function renderGit(git) {
  $('git-box').hidden = !git;
  const warnings = git ? gitWarnings(git) : [];
  const shown = JSON.stringify(warnings);
  if (shown !== state.gitWarnings) {  // rebuilt (and announced) only when they change
    state.gitWarnings = shown;
    $('git-warnings').replaceChildren(...warnings.map(({ label, message, when }) => el('div',
      { class: 'warning', role: 'alert' },
      el('strong', {}, label), el('span', { class: 'warning-message' }, message),
      when ? el('span', { class: 'small muted' }, when) : null)));
  }
  if (!git) return;
  $('git-repo').replaceChildren(git.root
    ? el('span', {}, el('code', {}, git.root), ` · ${git.file}`) : el('span', { class: 'muted' }, t('git.noRepo')));
  const dirty = git.clean === false;
  $('git-head').replaceChildren(git.head ? commitLine(git.head) : el('span', { class: 'muted' }, t('git.noCommit')),
    git.root ? el('span', { class: `badge ${dirty ? 's-pending' : 's-ok'}`, title: dirty ? t('git.dirtyHint') : '' },
      t(dirty ? 'git.dirty' : 'git.clean')) : null);
  const recent = git.recent || [];
  $('git-recent-row').hidden = recent.length === 0;
  $('git-recent').replaceChildren(...recent.map((commit) => el('li', {}, commitLine(commit))));
  const { following, lastSync } = git;
  $('git-following-row').hidden = !following;
  $('git-sync-row').hidden = !following;
  if (!following) return;
  $('git-following').replaceChildren(el('code', {}, `${following.remote}/${following.branch}`),
    ` · ${t('git.every', { every: period(following.every) })} · ${t(following.push ? 'git.push' : 'git.noPush')}`);
  $('git-sync').replaceChildren(lastSync
    ? el('span', {}, el('time', { datetime: lastSync.at }, stamp(lastSync.at)), ' · ',
      ...lastSync.outcomes.flatMap(({ kind }, index) => [index ? ', ' : '',
        el('span', { class: `git-${kind}` }, t(`git.outcome.${kind}`))]))
    : el('span', { class: 'muted' }, t('file.never')));
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
  if (view === 'usage') {
    renderUsage();
    loadUsage();
  }
  if (view === 'file') {
    state.focus = arg;
    state.scrollToFocus = true;
    renderFile();
    loadDesired();
  }
}

function relabel() {
  translate();
  for (const row of state.rows.values()) {  // translate() did their data-i18n texts
    labelRow(row);
    fillRow(row);
  }
  renderSummary();
  applyFilter();
  renderActivity();
  if (state.pool) renderPool(state.pool);
  renderUsage();
  renderFile();
  if (state.live !== null) setLive(state.live);
  setLogState(state.logState);
}

function start() {
  $('lang').value = lang();
  translate();
  $('lang').addEventListener('change', () => { setLang($('lang').value); relabel(); });
  $('signin-form').addEventListener('submit', signIn);
  $('signout').addEventListener('click', () => signOut());
  $('create-form').addEventListener('submit', create);
  $('instances').addEventListener('click', onRowClick);
  $('instances').addEventListener('keydown', onRowKey);
  $('instance-search').addEventListener('input', filterBy);
  $('state-filter').addEventListener('change', filterBy);
  $('log-instance').addEventListener('change', () => { location.hash = `#logs/${$('log-instance').value}`; });
  $('log-reload').addEventListener('click', () => showLogs());
  $('log-follow').addEventListener('change', () => showLogs());
  $('pool-copy').addEventListener('click', (event) => copy($('pool-url').textContent, event.currentTarget));
  $('dialog-copy').addEventListener('click', (event) => copy($('dialog-secret-value').value, event.currentTarget,
    $('dialog-secret-value')));
  window.addEventListener('hashchange', route);
  new ResizeObserver(() => {  // the chart is drawn at the width it is shown
    if ($('chart-plot').clientWidth !== state.chartWidth) drawUsageChart();
  }).observe($('chart-plot'));
  document.addEventListener('visibilitychange', () => { if (!document.hidden && state.usageTimer) loadUsage(); });
  document.addEventListener('click', (event) => {  // an open menu closes when the click is elsewhere
    for (const menu of document.querySelectorAll('details.menu[open]')) {
      if (!menu.contains(event.target)) menu.open = false;
    }
  });
  setInterval(() => { for (const row of state.rows.values()) setText(row.cells.uptime, uptime(row)); }, 1000);
  if (!session.key) return showSignIn();
  json('GET', 'api/status').then(enter, (error) => {
    if (!(error instanceof ApiError)) return showSignIn(t('err.network', { reason: error.message }));
    signOut(error.message);
    if (error.status === 429) waitToRetry(error);
  });
}

start();
