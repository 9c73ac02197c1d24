// @ts-check
// The key pool view: its balance and keys, the proxy's URL, each account and each key
import { json } from '../api.js';
import { $, byId, el } from '../dom.js';
import { money, stamp } from '../format.js';
import { t } from '../i18n.js';
import { copy, handle } from '../messages.js';

/** @typedef {import('../api.js').Pool} Pool */

/** @type {Pool | null} the last shown, drawn again in another language */
let shown = null;

export async function loadPool() {
  try {
    renderPool(/** @type {Pool} */ (await json('GET', 'api/pool')));
  } catch (error) {
    handle(error);
  }
}

/** @param {string | null} url */
function proxyUrl(url) {  // a proxy on every address is reached here the way this page was
  return url ? url.replace(/\/\/(0\.0\.0\.0|\[::\])(?=[:/])/, `//${location.hostname}`) : '–';
}

/** @param {[string, Node | string][]} values  [the column's label, the content] */
function cells(values) {
  return values.map(([label, content]) => el('td', { dataset: { label: t(label) } }, content));
}

/** @param {Pool} doc  GET /api/pool, or the event stream's */
export function renderPool(doc) {
  shown = doc;
  $('pool-off').hidden = doc.running;
  $('pool-balance').textContent = money(doc.totalBalance);
  $('pool-keys').textContent = `${doc.keys.available} / ${doc.keys.total}`;
  $('pool-url').textContent = proxyUrl(doc.url);
  const accounts = Object.entries(doc.accounts);
  const accountTable = byId('accounts', HTMLTableElement);
  accountTable.tBodies[0].replaceChildren(...accounts.map(([name, account]) => {
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
  accountTable.hidden = accounts.length === 0;
  $('no-accounts').hidden = accounts.length > 0 || !doc.running;
  const keys = accounts.flatMap(([name, account]) => account.keys.map((key) => ({ ...key, account: name })));
  const keyTable = byId('keys', HTMLTableElement);
  keyTable.tBodies[0].replaceChildren(...keys.map((key) => el('tr', {}, ...cells([
    ['key.key', el('code', {}, key.key)], ['key.account', key.account],
    ['key.available',
      el('span', { class: `badge s-${key.available ? 'ok' : 'error'}` }, t(key.available ? 'yes' : 'no'))],
    ['key.balance', money(key.balance)], ['key.used', money(key.used)], ['key.requests', String(key.requests)],
    ['key.failures', String(key.failures)], ['key.cooldown', stamp(key.cooldown_until) || '—'],
  ]))));
  keyTable.hidden = keys.length === 0;
  $('no-keys').hidden = keys.length > 0 || !doc.running;
}

export function relabelPool() {
  if (shown) renderPool(shown);
}

export function wirePool() {
  const button = $('pool-copy');
  button.addEventListener('click', () => copy($('pool-url').textContent ?? '', button));
}
