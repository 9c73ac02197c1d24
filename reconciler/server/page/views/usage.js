// @ts-check
// The usage view: each caller's use against its budget and the chart of the last days' tokens.
// Polled, as there is no event per request; the rows of the instances view show the same use.
import { ApiError, failureText, json } from '../api.js';
import { $, byId } from '../dom.js';
import { clock } from '../format.js';
import { t } from '../i18n.js';
import { handle } from '../messages.js';
import { state } from '../state.js';
import { DAYS, addDays, drawChart, usageRows, wallTime } from '../usage.js';
import { fillRow } from './instances.js';

/**
 * @typedef {import('../api.js').Usage} Usage
 * @typedef {import('../api.js').History} History
 */

const USAGE_MS = 15000;  // GET /api/usage this often while signed in

const view = {
  /** @type {History | null} GET /api/usage?from=&to=: the chart's days */
  history: null,
  error: '',
  /** @type {number | null} */
  timer: null,
  seq: 0,
  chartWidth: 0,
};

const shown = () => !$('view-usage').hidden;

export function startUsage() {
  stopUsage();
  loadUsage();
  view.timer = setInterval(() => { if (!document.hidden) loadUsage(); }, USAGE_MS);
}

export function stopUsage() {
  clearInterval(view.timer ?? undefined);
  view.timer = null;
  view.seq += 1;  // an answer still on its way is dropped
}

export async function loadUsage() {
  const seq = ++view.seq;
  try {
    const usage = /** @type {Usage} */ (await json('GET', 'api/usage'));
    let history = view.history;
    if (shown() || !history) {
      const to = usage.window.day;
      history = /** @type {History} */ (await json('GET', `api/usage?from=${addDays(to, 1 - DAYS)}&to=${to}`));
    }
    if (seq !== view.seq) return;  // an older answer never overwrites a newer one
    Object.assign(state, { usage, usageAt: Date.now() });
    Object.assign(view, { history, error: '' });
  } catch (error) {
    if (seq !== view.seq) return;
    if (error instanceof ApiError && error.status === 401) return handle(error);
    view.error = failureText(error);
  }
  for (const row of state.rows.values()) fillRow(row);
  renderUsage();
}

export function renderUsage() {
  if (!shown()) return;  // drawn when shown (route): a table of 500 rows is not free
  $('usage-error').textContent = view.error ? t('use.unavailable', { reason: view.error }) : '';
  $('usage-error').hidden = !view.error;
  const { usage } = state;
  if (!usage) return;
  const { window: w } = usage;
  $('usage-window').textContent = t('use.window', { tz: w.timezone, day: w.day, dayReset: wallTime(w.resets?.day),
    monthReset: wallTime(w.resets?.month), at: clock(new Date(state.usageAt).toISOString()) });
  const rows = usageRows(usage);
  const table = byId('usage-table', HTMLTableElement);
  table.tBodies[0].replaceChildren(...rows);
  table.hidden = rows.length === 0;
  $('no-usage').hidden = rows.length > 0;
  drawUsageChart();
}

function drawUsageChart() {
  const plot = $('chart-plot');
  if (!view.history || !state.usage || !shown() || !plot.clientWidth) return;
  view.chartWidth = plot.clientWidth;
  drawChart({ plot, legend: $('chart-legend'), table: byId('chart-table', HTMLTableElement), history: view.history,
    ids: Object.keys(state.usage.instances || {}), width: plot.clientWidth });
}

/** The usage view shown: drawn from what it has, then read again */
export function showUsage() {
  renderUsage();
  loadUsage();
}

export function wireUsage() {
  new ResizeObserver(() => {  // the chart is drawn at the width it is shown
    if ($('chart-plot').clientWidth !== view.chartWidth) drawUsageChart();
  }).observe($('chart-plot'));
  document.addEventListener('visibilitychange', () => { if (!document.hidden && view.timer) loadUsage(); });
}
