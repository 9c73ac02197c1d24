// @ts-check
// What the instances used of the key pool against their budgets (GET /api/usage), and the chart of
// daily tokens per instance: an inline SVG drawn here, nothing loaded from anywhere. Plain DOM; every
// text goes in through textContent, every colour through an attribute or the CSSOM (the page's CSP
// allows no inline style). Drawn here for the instances view (a row's cell) and the usage view.
import { el } from './dom.js';
import { compact, count } from './format.js';
import { t } from './i18n.js';

/**
 * @typedef {import('./api.js').Budget} Budget
 * @typedef {import('./api.js').CallerUsage} CallerUsage
 * @typedef {import('./api.js').History} History
 * @typedef {import('./api.js').Usage} Usage
 * @typedef {{used: number, limit: number | null, left: number | null}} Part  tokens used of a limit
 */

const SVG = 'http://www.w3.org/2000/svg';
// Tableau 10: told apart in light and dark themes alike; the legend names each colour
const PALETTE = ['#4e79a7', '#f28e2b', '#e15759', '#76b7b2', '#59a14f', '#edc948', '#b07aa1', '#ff9da7',
  '#9c755f', '#bab0ac'];
export const DAYS = 30;

/**
 * @param {string} tag
 * @param {Record<string, string | number>} [attributes]
 * @param {...(Node | string)} children
 */
function shape(tag, attributes = {}, ...children) {
  const made = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) made.setAttribute(name, String(value));
  made.append(...children);
  return made;
}

/**
 * @param {unknown} value
 * @returns {value is number}
 */
const isSet = (value) => typeof value === 'number';

// -- days: YYYY-MM-DD strings in the ledger's time zone, counted as UTC dates (no zone shifts them)

/**
 * @param {string} day
 * @param {number} n
 */
export function addDays(day, n) {
  const date = new Date(`${day}T00:00:00Z`);
  date.setUTCDate(date.getUTCDate() + n);
  return date.toISOString().slice(0, 10);
}

/**
 * @param {string} from
 * @param {string} to
 */
export function dayRange(from, to) {
  const days = [];
  for (let day = from; day <= to && days.length < 400; day = addDays(day, 1)) days.push(day);
  return days;
}

// "2026-12-01T00:00:00+08:00" -> "2026-12-01 00:00": the wall time of the ledger's zone, as it says
/** @param {string | undefined} iso */
export const wallTime = (iso) => (iso ? iso.slice(0, 16).replace('T', ' ') : '—');

// -- an instance's use against its budget

// {today, month, budget, left} of one caller, from GET /api/usage or an instance row
/** @param {CallerUsage | null | undefined} entry */
export function limits(entry) {
  const budget = /** @type {Budget} */ (entry?.budget || {});
  const left = /** @type {Budget} */ (entry?.left || {});
  return {
    day: { used: entry?.today?.tokens ?? 0, limit: budget.tokens_per_day ?? null, left: left.tokens_per_day ?? null },
    month: { used: entry?.month?.tokens ?? 0, limit: budget.tokens_per_month ?? null,
      left: left.tokens_per_month ?? null },
    rpm: { limit: budget.requests_per_minute ?? null, left: left.requests_per_minute ?? null },
    none: ![budget.tokens_per_day, budget.tokens_per_month, budget.requests_per_minute].some(isSet),
  };
}

/** @param {Part} part */
const spent = (part) => isSet(part.limit) && (part.left === 0 || part.used >= part.limit);

// A bar of used / limit (role meter, with its numbers for a screen reader)
/**
 * @param {Part} part
 * @param {number} limit  part's
 * @param {string} what
 */
function meter(part, limit, what) {
  const ratio = limit > 0 ? Math.min(part.used / limit, 1) : 1;
  const fill = el('span', { class: 'fill' });
  fill.style.width = `${(ratio * 100).toFixed(1)}%`;
  const kind = spent(part) ? 'spent' : ratio >= 0.8 ? 'high' : '';
  return el('span', {
    class: `meter ${kind}`, role: 'meter', 'aria-valuemin': '0', 'aria-valuemax': String(limit),
    'aria-valuenow': String(Math.min(part.used, limit)),
    'aria-label': t('use.bar', { what, used: count(part.used), limit: count(limit) }),
  }, fill);
}

// One line (and its bar when there is a limit): "Today 30 / 50,000" or "Today 30 tokens"
/**
 * @param {'day' | 'month'} kind
 * @param {Part} part
 * @param {number | undefined} estimated
 * @param {{label?: boolean}} [options]
 */
function line(kind, part, estimated, { label = true } = {}) {
  const what = t(kind === 'day' ? 'use.today' : 'use.monthShort');
  const { limit } = part;
  const limited = isSet(limit);
  const number = el('span', { class: 'use-num' },
    limited ? t('use.of', { used: count(part.used), limit: count(part.limit) }) : t('use.tokens', { used: count(part.used) }));
  const row = el('span', { class: `use-line${spent(part) ? ' spent' : ''}`, 'data-kind': kind },
    label ? el('span', { class: 'use-what' }, what) : null, number,
    estimated ? el('span', { class: 'est', title: t('use.estimated', { n: estimated }) }, '≈') : null,
    spent(part) ? el('span', { class: 'use-flag' }, t('use.usedUp')) : null);
  return limited ? [row, meter(part, limit, what)] : [row];
}

// The instances table's cell: today against the daily limit, the month when it has a limit, else
// "no limit"; the requests-per-minute limit when there is one
/** @param {CallerUsage | null} entry */
export function usageCell(entry) {
  if (!entry) return el('span', { class: 'use muted' }, '—');
  const parts = limits(entry);
  const box = el('span', { class: 'use' }, ...line('day', parts.day, entry.today?.estimated));
  if (isSet(parts.month.limit)) box.append(...line('month', parts.month, entry.month?.estimated));
  if (parts.none) box.append(el('span', { class: 'use-note' }, t('use.noLimit')));
  else if (isSet(parts.rpm.limit)) {
    box.append(el('span', { class: `use-note${parts.rpm.left === 0 ? ' spent' : ''}`, title: t('use.rpmLimit',
      { n: count(parts.rpm.limit) }) }, t('use.rpmShort', { n: count(parts.rpm.limit) })));
  }
  return box;
}

// The usage view's table: one row a caller
/** @param {Usage} doc */
export function usageRows(doc) {
  return Object.entries(doc.instances || {}).map(([id, entry]) => {
    const parts = limits(entry);
    /**
     * @param {string} label
     * @param {...(Node | string)} content
     */
    const cell = (label, ...content) => el('td', { 'data-label': t(label) }, ...content);
    /**
     * @param {'day' | 'month'} kind
     * @param {Part} part
     * @param {number | undefined} estimated
     */
    const only = (kind, part, estimated) => el('span', { class: 'use' },
      ...line(kind, part, estimated, { label: false }),
      parts.none && kind === 'day' ? el('span', { class: 'use-note' }, t('use.noLimit')) : null);
    const rpm = isSet(parts.rpm.limit)
      ? el('span', { class: parts.rpm.left === 0 ? 'use-flag' : '' }, `${count(parts.rpm.limit)}${
        isSet(parts.rpm.left) ? ` · ${t('use.left', { left: count(parts.rpm.left) })}` : ''}`)
      : el('span', { class: 'muted' }, t('use.noLimit'));
    const tr = el('tr', {},
      cell('use.instance', el('code', {}, id)),
      cell('use.today', only('day', parts.day, entry.today?.estimated)),
      cell('use.month', only('month', parts.month, entry.month?.estimated)),
      cell('use.requests', `${count(entry.today?.requests)} / ${count(entry.month?.requests)}`),
      cell('use.errors', `${count(entry.today?.errors)} / ${count(entry.month?.errors)}`),
      cell('use.rpm', rpm));
    tr.dataset.id = id;
    return tr;
  });
}

// -- the chart

// every caller that used tokens in the range, in the order given (declared instances first), each
// with a colour that stays its own whatever the others do
/**
 * @param {History} history
 * @param {string[]} ids
 */
export function series(history, ids) {
  const order = [...ids];
  for (const row of history.days) if (!order.includes(row.instance)) order.push(row.instance);
  const used = new Set(history.days.filter((row) => row.tokens > 0).map((row) => row.instance));
  return order.map((id, index) => ({ id, color: PALETTE[index % PALETTE.length] }))
    .filter((one) => used.has(one.id))
    .map((one) => ({ ...one, total: history.days.filter((r) => r.instance === one.id)
      .reduce((sum, r) => sum + r.tokens, 0) }));
}

/**
 * @param {number} max
 * @param {number} [ticks]
 */
function niceStep(max, ticks = 4) {
  const rough = Math.max(max, 1) / ticks;
  const power = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= rough) ?? 10 * power;
  return Math.max(1, step);
}

// Stacked bars: a bar a day, a segment a caller. ``width`` in CSS pixels (the SVG is drawn at the size
// it is shown, so its text stays readable on a phone).
/**
 * @param {object} chart
 * @param {HTMLElement} chart.plot  where the SVG goes
 * @param {HTMLElement} chart.legend
 * @param {HTMLTableElement} chart.table  the same numbers
 * @param {History} chart.history
 * @param {string[]} chart.ids  the declared instances, in their order
 * @param {number} chart.width
 */
export function drawChart({ plot, legend, table, history, ids, width }) {
  const days = dayRange(history.from, history.to);
  const lines = series(history, ids);
  /** @type {Map<string, number>} */
  const tokens = new Map();  // `${day} ${id}` -> tokens
  for (const row of history.days) tokens.set(`${row.day} ${row.instance}`, row.tokens);
  const totals = days.map((day) => lines.reduce((sum, s) => sum + (tokens.get(`${day} ${s.id}`) || 0), 0));
  const step = niceStep(Math.max(0, ...totals));
  const top = step * Math.max(1, Math.ceil(Math.max(0, ...totals) / step));
  const ticks = [];
  for (let v = 0; v <= top; v += step) ticks.push(v);

  const W = Math.max(260, Math.round(width));
  const H = W < 560 ? 200 : 240;
  const left = 10 + 7 * Math.max(...ticks.map((v) => compact(v).length));
  const [right, over, under] = [8, 10, 24];
  const band = (W - left - right) / days.length;
  const barWidth = Math.max(2, band * 0.72);
  /** @param {number} v */
  const y = (v) => over + (H - over - under) * (1 - v / top);

  const summary = t('chart.summary', { from: history.from, to: history.to,
    parts: lines.length ? lines.map((s) => t('chart.part', { id: s.id, tokens: count(s.total) })).join('; ')
      : t('chart.empty') });
  const svg = shape('svg', { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': summary,
    class: 'chart-svg' });
  for (const v of ticks) {
    svg.append(shape('line', { x1: left, x2: W - right, y1: y(v), y2: y(v), class: v ? 'grid-line' : 'axis' }),
      shape('text', { x: left - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'tick' }, compact(v)));
  }
  const every = Math.max(1, Math.ceil(52 / band));  // a date label every so many days, 52 px apart at least
  days.forEach((day, index) => {
    const x = left + band * index + (band - barWidth) / 2;
    if ((days.length - 1 - index) % every === 0) {  // counted back from today, whose label ends at the edge
      const last = index === days.length - 1;
      svg.append(shape('text', { x: last ? x + barWidth : x + barWidth / 2, y: H - 8,
        'text-anchor': last ? 'end' : 'middle', class: 'tick' }, day.slice(5)));
    }
    let base = 0;
    for (const s of lines) {
      const value = tokens.get(`${day} ${s.id}`) || 0;
      if (!value) continue;
      const y1 = y(base + value);
      const h = Math.max(1, y(base) - y1);
      svg.append(shape('rect', { x, y: y1, width: barWidth, height: h, fill: s.color, 'data-id': s.id,
        'data-day': day }, shape('title', {}, t('chart.bar', { day, id: s.id, tokens: count(value) }))));
      base += value;
    }
  });
  if (!lines.length) {
    svg.append(shape('text', { x: left + (W - left - right) / 2, y: over + (H - over - under) / 2,
      'text-anchor': 'middle', class: 'empty-text' }, t('chart.empty')));
  }
  plot.replaceChildren(svg);

  legend.replaceChildren(...lines.map((s) => {
    const swatch = el('span', { class: 'swatch', 'aria-hidden': 'true' });
    swatch.style.background = s.color;
    const item = el('li', {}, swatch, el('code', {}, s.id), ' ',
      el('span', { class: 'muted' }, t('use.tokens', { used: count(s.total) })));
    item.dataset.id = s.id;
    item.dataset.total = String(s.total);
    return item;
  }));

  const used = days.filter((_day, index) => totals[index] > 0);
  table.createTHead().replaceChildren(el('tr', {}, el('th', { scope: 'col' }, t('chart.day')),
    ...lines.map((s) => el('th', { scope: 'col' }, s.id)), el('th', { scope: 'col' }, t('chart.total'))));
  table.tBodies[0].replaceChildren(...(used.length ? used.map((day) => {
    const tr = el('tr', {}, el('th', { scope: 'row' }, day),
      ...lines.map((s) => el('td', {}, count(tokens.get(`${day} ${s.id}`) || 0))),
      el('td', {}, count(totals[days.indexOf(day)])));
    tr.dataset.day = day;
    return tr;
  }) : [el('tr', {}, el('td', { colspan: String(lines.length + 2) }, t('chart.empty')))]));
}
