// @ts-check
// Numbers, sizes, durations and times as the page shows them, in the page's language
import { lang } from './i18n.js';

export const locale = () => (lang() === 'zh' ? 'zh-CN' : 'en-GB');

/** @param {string | null | undefined} iso */
export const clock = (iso) => (iso ? new Date(iso).toLocaleTimeString(locale(), { hour12: false }) : '');
/** @param {string | null | undefined} iso */
export const stamp = (iso) => (iso ? new Date(iso).toLocaleString(locale(), {
  month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false,
}) : '');
/** @param {string | null | undefined} iso */
export const moment = (iso) => (iso ? new Date(iso).toLocaleString(locale(), {
  year: 'numeric', month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit', hour12: false,
}) : '');
/** @param {unknown} value */
export const money = (value) => (typeof value === 'number' ? `¥${value.toFixed(2)}` : '—');

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
/** @param {unknown} bytes */
export function size(bytes) {  // 182 MiB, 1.4 GiB
  if (typeof bytes !== 'number') return '—';
  let value = bytes;
  let unit = 0;
  for (; value >= 1024 && unit < UNITS.length - 1; unit += 1) value /= 1024;
  return `${unit && value < 10 ? value.toFixed(1) : Math.round(value)} ${UNITS[unit]}`;
}

/** @param {number} seconds */
export function period(seconds) {  // settings.git.every: 1s, 30s, 1m, 1m 30s, 2h
  if (seconds < 60) return `${Number(seconds.toFixed(3))}s`;
  return duration(seconds).replace(/ 0[smh]$/, '');
}

/** @param {number} seconds */
export function duration(seconds) {
  const s = Math.floor(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

// one formatter per language: toLocaleString makes a new one on each call, slow in a table of 500;
// and none for a whole number under 1,000 (most of a big fleet's), which no language groups
/** @type {Map<string, Intl.NumberFormat>} */
const counters = new Map();
/** @param {unknown} n */
export function count(n) {
  if (typeof n !== 'number') return '—';
  if (Number.isInteger(n) && Math.abs(n) < 1000) return String(n);
  let counter = counters.get(locale());
  if (!counter) {
    counter = new Intl.NumberFormat(locale());
    counters.set(locale(), counter);
  }
  return counter.format(n);
}

/** @param {number} n */
export const compact = (n) => n.toLocaleString(locale(), { notation: 'compact', maximumFractionDigits: 1 });
