// What the instances used of the key pool against their budgets (GET /api/usage), and the chart of
// daily tokens per instance: an inline SVG drawn here, nothing loaded from anywhere. Plain DOM; every
// text goes in through textContent, every colour through an attribute or the CSSOM (the page's CSP
// allows no inline style).
import { lang, t } from './i18n.js';

const SVG = 'http://www.w3.org/2000/svg';
// Tableau 10: told apart in light and dark themes alike; the legend names each colour
const PALETTE = ['#4e79a7', '#f28e2b', '#e15759', '#76b7b2', '#59a14f', '#edc948', '#b07aa1', '#ff9da7',
  '#9c755f', '#bab0ac'];
export const DAYS = 30;

function node(tag, props = {}, ...children) {
  const made = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === 'class') made.className = value;
    else made.setAttribute(name, value);
  }
  made.append(...children.filter((child) => child !== null && child !== undefined));
  return made;
}

function shape(tag, attributes = {}, ...children) {
  const made = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) made.setAttribute(name, String(value));
  made.append(...children);
  return made;
}

const locale = () => (lang() === 'zh' ? 'zh-CN' : 'en-GB');
// one formatter per language: toLocaleString makes a new one on each call, slow in a table of 500;
// and none for a whole number under 1,000 (most of a big fleet's), which no language groups
const counters = new Map();
export function count(n) {
  if (typeof n !== 'number') return '—';
  if (Number.isInteger(n) && Math.abs(n) < 1000) return String(n);
  if (!counters.has(locale())) counters.set(locale(), new Intl.NumberFormat(locale()));
  return counters.get(locale()).format(n);
}
const compact = (n) => n.toLocaleString(locale(), { notation: 'compact', maximumFractionDigits: 1 });
const isSet = (value) => typeof value === 'number';

// -- days: YYYY-MM-DD strings in the ledger's time zone, counted as UTC dates (no zone shifts them)

export function addDays(day, n) {
  const date = new Date(`${day}T00:00:00Z`);
  date.setUTCDate(date.getUTCDate() + n);
  return date.toISOString().slice(0, 10);
}

export function dayRange(from, to) {
  const days = [];
  for (let day = from; day <= to && days.length < 400; day = addDays(day, 1)) days.push(day);
  return days;
}

// "2026-12-01T00:00:00+08:00" -> "2026-12-01 00:00": the wall time of the ledger's zone, as it says
export const wallTime = (iso) => (iso ? iso.slice(0, 16).replace('T', ' ') : '—');

// -- an instance's use against its budget

// {today, month, budget, left} of one caller, from GET /api/usage or an instance row
export function limits(entry) {
  const budget = entry?.budget || {};
  const left = entry?.left || {};
  return {
    day: { used: entry?.today?.tokens ?? 0, limit: budget.tokens_per_day ?? null, left: left.tokens_per_day ?? null },
    month: { used: entry?.month?.tokens ?? 0, limit: budget.tokens_per_month ?? null,
      left: left.tokens_per_month ?? null },
    rpm: { limit: budget.requests_per_minute ?? null, left: left.requests_per_minute ?? null },
    none: ![budget.tokens_per_day, budget.tokens_per_month, budget.requests_per_minute].some(isSet),
  };
}

const spent = (part) => isSet(part.limit) && (part.left === 0 || part.used >= part.limit);

// A bar of used / limit (role meter, with its numbers for a screen reader)
function meter(part, what) {
  const ratio = part.limit > 0 ? Math.min(part.used / part.limit, 1) : 1;
  const fill = node('span', { class: 'fill' });
  fill.style.width = `${(ratio * 100).toFixed(1)}%`;
  const kind = spent(part) ? 'spent' : ratio >= 0.8 ? 'high' : '';
  return node('span', {
    class: `meter ${kind}`, role: 'meter', 'aria-valuemin': '0', 'aria-valuemax': String(part.limit),
    'aria-valuenow': String(Math.min(part.used, part.limit)),
    'aria-label': t('use.bar', { what, used: count(part.used), limit: count(part.limit) }),
  }, fill);
}

// One line (and its bar when there is a limit): "Today 30 / 50,000" or "Today 30 tokens"
function line(kind, part, estimated, { label = true } = {}) {
  const what = t(kind === 'day' ? 'use.today' : 'use.monthShort');
  const limited = isSet(part.limit);
  const number = node('span', { class: 'use-num' },
    limited ? t('use.of', { used: count(part.used), limit: count(part.limit) }) : t('use.tokens', { used: count(part.used) }));
  const row = node('span', { class: `use-line${spent(part) ? ' spent' : ''}`, 'data-kind': kind },
    label ? node('span', { class: 'use-what' }, what) : null, number,
    estimated ? node('span', { class: 'est', title: t('use.estimated', { n: estimated }) }, '≈') : null,
    spent(part) ? node('span', { class: 'use-flag' }, t('use.usedUp')) : null);
  return limited ? [row, meter(part, what)] : [row];
}

// The instances table's cell: today against the daily limit, the month when it has a limit, else
// "no limit"; the requests-per-minute limit when there is one
export function usageCell(entry) {
  if (!entry) return node('span', { class: 'use muted' }, '—');
  const parts = limits(entry);
  const box = node('span', { class: 'use' }, ...line('day', parts.day, entry.today?.estimated));
  if (isSet(parts.month.limit)) box.append(...line('month', parts.month, entry.month?.estimated));
  if (parts.none) box.append(node('span', { class: 'use-note' }, t('use.noLimit')));
  else if (isSet(parts.rpm.limit)) {
    box.append(node('span', { class: `use-note${parts.rpm.left === 0 ? ' spent' : ''}`, title: t('use.rpmLimit',
      { n: count(parts.rpm.limit) }) }, t('use.rpmShort', { n: count(parts.rpm.limit) })));
  }
  return box;
}

// The usage view's table: one row a caller
export function usageRows(doc) {
  return Object.entries(doc.instances || {}).map(([id, entry]) => {
    const parts = limits(entry);
    const cell = (label, ...content) => node('td', { 'data-label': t(label) }, ...content);
    const only = (kind, part, estimated) => node('span', { class: 'use' },
      ...line(kind, part, estimated, { label: false }),
      parts.none && kind === 'day' ? node('span', { class: 'use-note' }, t('use.noLimit')) : null);
    const rpm = isSet(parts.rpm.limit)
      ? node('span', { class: parts.rpm.left === 0 ? 'use-flag' : '' }, `${count(parts.rpm.limit)}${
        isSet(parts.rpm.left) ? ` · ${t('use.left', { left: count(parts.rpm.left) })}` : ''}`)
      : node('span', { class: 'muted' }, t('use.noLimit'));
    const tr = node('tr', {},
      cell('use.instance', node('code', {}, id)),
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
export function series(history, ids) {
  const order = [...ids];
  for (const row of history.days) if (!order.includes(row.instance)) order.push(row.instance);
  const used = new Set(history.days.filter((row) => row.tokens > 0).map((row) => row.instance));
  return order.map((id, index) => ({ id, color: PALETTE[index % PALETTE.length] }))
    .filter((one) => used.has(one.id))
    .map((one) => ({ ...one, total: history.days.filter((r) => r.instance === one.id)
      .reduce((sum, r) => sum + r.tokens, 0) }));
}

function niceStep(max, ticks = 4) {
  const rough = Math.max(max, 1) / ticks;
  const power = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= rough);
  return Math.max(1, step);
}

// Stacked bars: a bar a day, a segment a caller. ``width`` in CSS pixels (the SVG is drawn at the size
// it is shown, so its text stays readable on a phone).
export function drawChart({ plot, legend, table, history, ids, width }) {
  const days = dayRange(history.from, history.to);
  const lines = series(history, ids);
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
    const swatch = node('span', { class: 'swatch', 'aria-hidden': 'true' });
    swatch.style.background = s.color;
    const item = node('li', {}, swatch, node('code', {}, s.id), ' ',
      node('span', { class: 'muted' }, t('use.tokens', { used: count(s.total) })));
    item.dataset.id = s.id;
    item.dataset.total = String(s.total);
    return item;
  }));

  const used = days.filter((day, index) => totals[index] > 0);
  table.tHead.replaceChildren(node('tr', {}, node('th', { scope: 'col' }, t('chart.day')),
    ...lines.map((s) => node('th', { scope: 'col' }, s.id)), node('th', { scope: 'col' }, t('chart.total'))));
  table.tBodies[0].replaceChildren(...(used.length ? used.map((day) => {
    const tr = node('tr', {}, node('th', { scope: 'row' }, day),
      ...lines.map((s) => node('td', {}, count(tokens.get(`${day} ${s.id}`) || 0))),
      node('td', {}, count(totals[days.indexOf(day)])));
    tr.dataset.day = day;
    return tr;
  }) : [node('tr', {}, node('td', { colspan: String(lines.length + 2) }, t('chart.empty')))]));
}
