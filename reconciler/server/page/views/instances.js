// @ts-check
// The instances view: the summary, search and state filter, one row an instance with its actions,
// the form that creates one, and the activity the event stream reports.
import { call, json } from '../api.js';
import { $, byId, el, find, setText } from '../dom.js';
import { clock, count, duration, size, stamp } from '../format.js';
import { lang, t, translate } from '../i18n.js';
import { dialog, handle, toast } from '../messages.js';
import { state } from '../state.js';
import { later } from '../timers.js';
import { usageCell } from '../usage.js';

/**
 * @typedef {import('../api.js').Instance} Instance
 * @typedef {typeof COLUMNS[number]} Column
 *
 * @typedef {object} Row  an instance's <tr>, the parts of it that change, and what it was drawn from
 * @property {string} id
 * @property {Instance} data
 * @property {HTMLTableRowElement} tr
 * @property {Record<Column, HTMLTableCellElement>} cells
 * @property {string | null} pending  the action under way (its status: stopping, parking, ...)
 * @property {string | null} flash  an event's status shown until the list says what it is now
 * @property {string} [drawnFrom]
 * @property {HTMLAnchorElement} url
 * @property {HTMLAnchorElement} fileLink
 * @property {HTMLElement} badge
 * @property {HTMLElement} memory
 * @property {HTMLElement} path
 * @property {HTMLElement} disk
 * @property {HTMLButtonElement} toggle
 * @property {HTMLButtonElement} park
 * @property {HTMLButtonElement} restart
 * @property {HTMLElement} more
 *
 * @typedef {object} Activity  a line of the activity list
 * @property {string} at
 * @property {string} id
 * @property {string} change
 * @property {string} [detail]
 */

const COLUMNS = /** @type {const} */ (['id', 'port', 'desired', 'status', 'uptime', 'restarts', 'usage', 'failure',
  'dataDir', 'actions']);
// What CST observes of an instance, for rows from a server that says only the seed's status
/** @type {Record<string, string>} */
const OBSERVED_OF_STATUS = { online: 'running', stopped: 'stopped', errored: 'errored' };
// The summary's and the state filter's groups: every way of failing to run counts as errored
/** @type {Record<string, string>} */
const GROUP_OF_OBSERVED = { running: 'running', parked: 'parked', stopped: 'stopped', crashed: 'errored',
  'port-taken': 'errored', errored: 'errored' };
const GROUPS = ['running', 'parked', 'stopped', 'errored'];

const view = {
  search: '',          // the instances shown: ids or ports containing this, in this group (or 'all')
  group: 'all',
  fetchedAt: 0,        // when the rows' uptimes were measured
  listSeq: 0,
  /** @type {Activity[]} */
  activity: [],
};

/** @type {(() => void)[]} */
const listeners = [];
/** @param {() => void} listener  called after each new list (the logs view's choice of instance) */
export function onListed(listener) {
  listeners.push(listener);
}

export async function loadInstances() {
  const seq = ++view.listSeq;
  try {
    const rows = /** @type {Instance[]} */ (await json('GET', 'api/instances'));
    if (seq === view.listSeq) renderInstances(rows);  // an older answer never overwrites a newer one
  } catch (error) {
    handle(error);
  }
}

// Rows are made once and then only changed: a row whose data did not change is not touched, so a
// live update at 500 instances costs what the few changed rows cost.
/** @param {Instance[]} list */
function renderInstances(list) {
  view.fetchedAt = Date.now();
  const table = byId('instances', HTMLTableElement);
  const body = table.tBodies[0];
  /** @type {Set<string>} */
  const seen = new Set();
  list.forEach((data, index) => {
    let row = state.rows.get(data.id);
    if (!row) {
      row = makeRow(data);
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
  table.hidden = list.length === 0;
  $('no-instances').hidden = list.length > 0;
  renderSummary();
  applyFilter();
  for (const listener of listeners) listener();
}

/** @param {Instance} data */
export const observedOf = (data) => data.observed ?? OBSERVED_OF_STATUS[data.status];
/** @param {Instance} data */
const groupOf = (data) => GROUP_OF_OBSERVED[observedOf(data)] ?? 'errored';

function renderSummary() {
  /** @type {Record<string, number>} */
  const counts = Object.fromEntries(GROUPS.map((group) => [group, 0]));
  /** @type {number | null} */
  let memory = null;  // stays null from a server that does not report memory: shown as "—", not 0 B
  /** @type {number | null} */
  let disk = null;    // likewise, and before cst serve's first walk of the data dirs
  for (const { data } of state.rows.values()) {
    counts[groupOf(data)] += 1;
    if ('memory' in data) memory = (memory ?? 0) + (data.memory ?? 0);
    if (typeof data.disk === 'number') disk = (disk ?? 0) + data.disk;
  }
  for (const group of GROUPS) setText($(`sum-${group}`), count(counts[group]));
  $('sum-errored').parentElement?.classList.toggle('alert', counts.errored > 0);
  setText($('sum-memory'), size(memory));
  setText($('sum-disk'), size(disk));
}

/** @param {Row} row */
function matches(row) {
  const { search, group } = view;
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
  const filtering = view.search !== '' || view.group !== 'all';
  setText($('shown-count'), filtering ? t('filter.shown', { shown: count(shown), total: count(total) }) : '');
  $('no-match').hidden = !(total > 0 && shown === 0);
}

function filterBy() {
  view.search = byId('instance-search', HTMLInputElement).value.trim().toLowerCase();
  view.group = byId('state-filter', HTMLSelectElement).value;
  applyFilter();
}

// A row is a clone of one built here, for the page's language: at 500 rows cloning is several
// times faster than building each element by element. Its buttons carry data-act and are answered
// by one listener on the table (onRowClick).
/** @type {Map<string, HTMLTableRowElement>} */
const rowTemplates = new Map();  // language -> <tr>

function rowTemplate() {
  let tr = rowTemplates.get(lang());
  if (!tr) {
    tr = el('tr', {}, ...COLUMNS.map((column) => el('td', { class: `c-${column}` })));
    const cells = tr.cells;
    /** @param {Column} column */
    const cell = (column) => cells[COLUMNS.indexOf(column)];
    cell('id').append(el('span', {}, el('code'), el('a', { class: 'small url', target: '_blank', rel: 'noopener' }),
      el('a', { class: 'small file-link' })));
    cell('status').append(el('span', { class: 'badge' }), el('span', { class: 'memory' }));
    // one child: at phone width the cell is a flex line of its label and this, the size under the path
    cell('dataDir').append(el('span', {}, el('span', { class: 'path' }), el('span', { class: 'disk' })));
    /**
     * @param {string} act
     * @param {{class?: string, dataset?: Record<string, string>}} [extra]
     */
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
  return tr;
}

/** @param {Instance} data */
function makeRow(data) {
  const { id } = data;
  const tr = /** @type {HTMLTableRowElement} */ (rowTemplate().cloneNode(true));
  tr.dataset.id = id;
  /**
   * @template {Element} T
   * @param {string} selector
   * @param {new () => T} type
   */
  const pick = (selector, type) => find(tr, selector, type);
  /** @type {Row} */
  const row = { id, data, tr,
    cells: /** @type {Record<Column, HTMLTableCellElement>} */ (
      Object.fromEntries(COLUMNS.map((column, index) => [column, tr.cells[index]]))),
    pending: null, flash: null, url: pick('.url', HTMLAnchorElement), fileLink: pick('.file-link', HTMLAnchorElement),
    badge: pick('.badge', HTMLElement), memory: pick('.memory', HTMLElement),
    path: pick('.path', HTMLElement), disk: pick('.disk', HTMLElement),
    toggle: pick('.toggle', HTMLButtonElement), park: pick('.park', HTMLButtonElement),
    restart: pick('.restart', HTMLButtonElement), more: pick('summary', HTMLElement) };
  pick('code', HTMLElement).textContent = id;
  row.fileLink.href = `#file/${id}`;
  pick('.in-file', HTMLAnchorElement).href = `#file/${id}`;
  pick('.logs', HTMLAnchorElement).href = `#logs/${id}`;
  labelRow(row);
  return row;
}

/** @param {Row} row */
function labelRow(row) {  // what changes only with the language, but for data-i18n (translate)
  for (const column of COLUMNS) row.cells[column].dataset.label = t(`col.${column}`);  // the phone layout's labels
  row.fileLink.title = t('act.file');
  row.memory.title = t('memory');
  row.disk.title = t('disk');
}

/** @type {Record<string, (row: Row) => unknown>} */
const ROW_ACTIONS = {
  toggle, park: parkOrWake, restart: (row) => act(row, 'restarting', 'POST', '/restart'),
  password: resetPassword, backup, delete: remove,
};

/** @param {MouseEvent} event */
function onRowClick(event) {
  if (!(event.target instanceof Element)) return;
  const menu = event.target.closest('.menu-items')?.closest('details');
  if (menu) menu.open = false;  // a choice made in a row's menu closes it
  const button = /** @type {HTMLButtonElement | null} */ (event.target.closest('button[data-act]'));
  const row = button && state.rows.get(button.closest('tr')?.dataset.id ?? '');
  if (button && row) ROW_ACTIONS[button.dataset.act ?? '']?.(row);
}

/** @param {KeyboardEvent} event */
function onRowKey(event) {  // Escape closes a row's open menu and leaves the focus on it
  if (!(event.target instanceof Element)) return;
  const menu = /** @type {HTMLDetailsElement | null} */ (event.target.closest('details.menu[open]'));
  if (event.key !== 'Escape' || !menu) return;
  menu.open = false;
  menu.querySelector('summary')?.focus();
}

/** @param {Row} row */
export function fillRow(row) {
  fillFileLink(row);
  const { data, cells } = row;
  const usage = usageOf(row);
  const observed = observedOf(data);
  const status = row.pending || row.flash || observed;
  // everything the row shows but its uptime, which the clock moves (see tickUptimes), and its lines
  const drawnFrom = JSON.stringify([lang(), status, usage, { ...data, uptime: null }]);
  if (drawnFrom === row.drawnFrom) return;
  row.drawnFrom = drawnFrom;
  cells.port.textContent = String(data.port);
  setText(row.url, data.url ? data.url.replace(/^https?:\/\//, '') : '');
  if (data.url) row.url.href = data.url;
  else row.url.removeAttribute('href');
  cells.desired.textContent = t(`desired.${data.desired}`);
  row.badge.textContent = t(`status.${status}`);
  row.badge.className = `badge s-${status}`;
  row.badge.title = data.detail || '';
  row.memory.textContent = size(data.memory);
  cells.uptime.textContent = uptime(row);
  cells.restarts.textContent = String(data.restarts);
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

/** @param {Row} row */
export function fillFileLink(row) {  // GET /api/desired says where the instance is in the file
  const lines = state.desired?.instances?.[row.id];
  setText(row.fileLink, lines ? `desired.yaml:${lines.from}` : '');
}

// this instance's use and budget: from GET /api/usage, or from its row when that is newer
/** @param {Row} row */
function usageOf(row) {
  const polled = state.usage?.instances?.[row.id];
  const own = row.data.usage ? { ...row.data.usage, budget: row.data.budget ?? null, left: row.data.left ?? null }
    : null;
  return (polled && (state.usageAt >= view.fetchedAt || !own)) ? polled : own || polled || null;
}

/** @param {Row} row */
function uptime(row) {
  const { uptime: base } = row.data;
  return base === null || base === undefined ? '—' : duration(base + (Date.now() - view.fetchedAt) / 1000);
}

export function tickUptimes() {  // each second: the uptimes move with the clock between two lists
  for (const row of state.rows.values()) setText(row.cells.uptime, uptime(row));
}

/**
 * @param {Row} row
 * @param {string} pendingStatus
 * @param {'POST' | 'DELETE'} method
 * @param {string} path  after the instance's
 */
async function run(row, pendingStatus, method, path) {
  row.pending = pendingStatus;
  fillRow(row);
  try {
    return await json(method, `api/instances/${encodeURIComponent(row.id)}${path}`);
  } finally {
    row.pending = null;
    if (state.rows.get(row.id) === row) fillRow(row);
    later(loadInstances, 0);
  }
}

// an action whose answer is a message: shown, as is an error
/**
 * @param {Row} row
 * @param {string} pendingStatus
 * @param {'POST' | 'DELETE'} method
 * @param {string} path
 */
async function act(row, pendingStatus, method, path) {
  try {
    toast(/** @type {{message: string}} */ (await run(row, pendingStatus, method, path)).message);
  } catch (error) {
    handle(error);
  }
}

/** @param {Row} row */
function toggle(row) {
  const stop = row.data.desired === 'running';
  return act(row, stop ? 'stopping' : 'starting', 'POST', stop ? '/stop' : '/start');
}

/** @param {Row} row */
function parkOrWake(row) {
  const wake = observedOf(row.data) === 'parked';
  return act(row, wake ? 'waking' : 'parking', 'POST', wake ? '/wake' : '/park');
}

/** @param {Row} row */
async function resetPassword(row) {
  const title = t('password.title', { id: row.id });
  if (!await dialog({ title, text: t('password.text'), ok: t('password.ok') })) return;
  try {
    const answer = /** @type {{password: string}} */ (await run(row, 'resetting', 'POST', '/reset-password'));
    await dialog({ title: t('secret.password', { id: row.id }), text: t('secret.text', { id: row.id }),
      secret: answer.password, cancel: false, ok: t('close') });
  } catch (error) {
    handle(error);
  }
}

/** @param {Row} row */
async function remove(row) {
  const text = t('delete.text', { dataDir: row.data.dataDir, archive: state.archiveDir, id: row.id });
  if (await dialog({ title: t('delete.title', { id: row.id }), text, ok: t('delete.ok'), danger: true })) {
    await act(row, 'deleting', 'DELETE', '');
  }
}

/** @param {Row} row */
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

/** @param {SubmitEvent} event */
async function create(event) {
  event.preventDefault();
  const port = Number(byId('new-port', HTMLInputElement).value);
  const button = byId('create-submit', HTMLButtonElement);
  button.disabled = true;
  const busy = toast(t('create.busy', { id: `st-instance-${port}` }));
  try {
    const answer = /** @type {{id: string, password: string}} */ (
      await json('POST', 'api/instances', { body: { port } }));
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

export async function suggestPort() {
  try {
    const { port } = /** @type {{port: number}} */ (await json('GET', 'api/free-port'));
    byId('new-port', HTMLInputElement).value = String(port);
  } catch {
    // no suggestion: the field stays as it is and the operator types a port
  }
}

// -- the activity: what the event stream said happened, newest first

/** @param {Activity} entry */
export function note(entry) {
  view.activity.unshift(entry);
  view.activity.length = Math.min(view.activity.length, 50);
  renderActivity();
}

function renderActivity() {
  $('activity').replaceChildren(...view.activity.map(({ at, id, change, detail }) => el('li', {},
    el('time', { datetime: at }, clock(at)), ' ', id ? el('code', {}, id) : null, ' ',
    el('strong', { class: `c-${change}` }, t(`change.${change}`)), detail ? ` ${detail}` : null)));
  $('no-activity').hidden = view.activity.length > 0;
}

/**
 * An instance event: noted, its row flashes a crash, and the list is read again
 * @param {Activity} entry
 */
export function onInstanceEvent(entry) {
  note(entry);
  const row = state.rows.get(entry.id);
  if (row && entry.change === 'crashed') {  // shown until the list says what it is now
    row.flash = 'crashed';
    fillRow(row);
  }
  later(loadInstances);
}

export function relabelInstances() {
  for (const row of state.rows.values()) {  // translate() did their data-i18n texts
    labelRow(row);
    fillRow(row);
  }
  renderSummary();
  applyFilter();
  renderActivity();
}

export function wireInstances() {
  byId('create-form', HTMLFormElement).addEventListener('submit', create);
  $('instances').addEventListener('click', onRowClick);
  $('instances').addEventListener('keydown', onRowKey);
  $('instance-search').addEventListener('input', filterBy);
  $('state-filter').addEventListener('change', filterBy);
  document.addEventListener('click', (event) => {  // an open menu closes when the click is elsewhere
    const open = /** @type {NodeListOf<HTMLDetailsElement>} */ (document.querySelectorAll('details.menu[open]'));
    for (const menu of open) {
      if (!(event.target instanceof Node && menu.contains(event.target))) menu.open = false;
    }
  });
}
