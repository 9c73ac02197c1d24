// The key pool panel in SillyTavern's extension settings: the successor of the DaiDai API
// Aggregator's panel, reading everything from CST's server plugin (/api/plugins/cst/pool), which
// relays the local proxy's status with this instance's own key. Keys arrive masked; the page never
// sees a whole key and never talks to the proxy itself. It also shows this instance's use today and
// this month against its budget (the proxy's ledger), and says so when a limit is used up. Text
// follows SillyTavern's language (i18n/zh-cn.json for Chinese).
import { getRequestHeaders } from '../../../../script.js';
import { eventSource, event_types } from '../../../events.js';
import { t } from '../../../i18n.js';
import { copyText } from '../../../utils.js';

const POOL_URL = '/api/plugins/cst/pool';
let proxyUrl = '';
let loading = null;

function escape(text) {
    return String(text).replace(/[&<>"']/g, c => `&#${c.charCodeAt(0)};`);
}

function money(value) {
    return value === null || value === undefined ? '—' : `¥${Number(value).toFixed(2)}`;
}

function count(value) {
    return typeof value === 'number' ? value.toLocaleString() : '0';
}

// "2026-12-01T00:00:00+08:00" -> "2026-12-01 00:00": the wall time of the ledger's time zone
function wallTime(iso) {
    return iso ? String(iso).slice(0, 16).replace('T', ' ') : '';
}

function panelHtml() {
    return `
<div id="cst_keypool" class="cst-keypool">
    <div class="inline-drawer">
        <div class="inline-drawer-toggle inline-drawer-header">
            <b>${t`CST key pool`}</b>
            <div class="inline-drawer-icon fa-solid fa-circle-chevron-down down"></div>
        </div>
        <div class="inline-drawer-content"><div class="cst-keypool-body">
            <div class="cst-keypool-stats">
                <div class="cst-keypool-stat">
                    <span class="cst-keypool-label">${t`Total balance`}</span>
                    <span class="cst-keypool-value" data-cst="balance">—</span>
                </div>
                <div class="cst-keypool-stat">
                    <span class="cst-keypool-label">${t`Usable keys`}</span>
                    <span class="cst-keypool-value" data-cst="usable">—</span>
                </div>
            </div>
            <div class="cst-keypool-proxy">
                <div class="cst-keypool-row">
                    <span class="cst-keypool-label">${t`Proxy`}</span>
                    <span class="cst-keypool-state" data-cst="state"><span class="cst-keypool-dot"></span><span data-cst="state-text">${t`Loading…`}</span></span>
                </div>
                <div class="cst-keypool-row cst-keypool-url-row">
                    <code class="cst-keypool-url" data-cst="url"></code>
                    <div class="menu_button menu_button_icon cst-keypool-copy" data-cst-action="copy" title="${t`Copy the proxy URL`}">
                        <i class="fa-solid fa-copy"></i>
                    </div>
                </div>
            </div>
            <div class="cst-keypool-usage" data-cst="usage">
                <div class="cst-keypool-usage-head">
                    <span class="cst-keypool-label">${t`This instance's use`}</span>
                    <small class="cst-keypool-zone" data-cst="zone"></small>
                </div>
                <div class="cst-keypool-use" data-cst="day">
                    <div class="cst-keypool-use-line">
                        <span class="cst-keypool-use-what">${t`Today`}</span>
                        <span><b data-cst="tokens">0</b><span data-cst="day-limit"></span> ${t`tokens`} · <b data-cst="requests">0</b> ${t`requests`}</span>
                    </div>
                    <div class="cst-keypool-meter" data-cst="day-meter" role="meter" aria-valuemin="0"><span></span></div>
                </div>
                <div class="cst-keypool-use" data-cst="month">
                    <div class="cst-keypool-use-line">
                        <span class="cst-keypool-use-what">${t`This month`}</span>
                        <span><b data-cst="month-tokens">0</b><span data-cst="month-limit"></span> ${t`tokens`} · <b data-cst="month-requests">0</b> ${t`requests`}</span>
                    </div>
                    <div class="cst-keypool-meter" data-cst="month-meter" role="meter" aria-valuemin="0"><span></span></div>
                </div>
                <div class="cst-keypool-use-note" data-cst="limits" style="display: none"></div>
                <div class="cst-keypool-spent" data-cst="spent" style="display: none" role="alert"></div>
            </div>
            <table class="cst-keypool-keys">
                <thead><tr><th>${t`Key`}</th><th>${t`Balance`}</th><th>${t`Used`}</th></tr></thead>
                <tbody data-cst="keys"></tbody>
            </table>
            <div class="cst-keypool-footer">
                <div class="menu_button menu_button_icon" data-cst-action="refresh">
                    <i class="fa-solid fa-arrows-rotate"></i><span>${t`Refresh`}</span>
                </div>
                <small class="cst-keypool-updated" data-cst="updated"></small>
            </div>
        </div></div>
    </div>
</div>`;
}

function field(name) {
    return $(`#cst_keypool [data-cst="${name}"]`);
}

function showState(kind, text) {
    field('state').attr('data-state', kind);
    field('state-text').text(text);
}

function render(data) {
    const proxy = data.proxy ?? {};
    proxyUrl = proxy.url ?? '';
    field('url').text(proxyUrl);
    $('#cst_keypool .cst-keypool-copy').toggle(Boolean(proxyUrl));
    if (proxy.state === 'off') {
        showState('off', t`Not used by this instance`);
    } else if (proxy.state !== 'up') {
        showState('down', proxy.state === 'down' ? t`Unreachable` : `${t`Error`} ${proxy.status ?? ''}`.trim());
        field('state').attr('title', proxy.message ?? '');
    } else {
        const usable = data.pool.available > 0;
        showState(usable ? 'up' : 'warn', usable ? t`Running` : t`No usable key`);
        field('state').attr('title', '');
    }
    const pool = data.pool;
    field('balance').text(pool ? money(pool.balance) : '—');
    field('usable').text(pool ? `${pool.available} / ${pool.total}` : '—');
    renderUsage(data);
    const rows = (pool?.keys ?? []).map(key => `
        <tr class="${key.available ? '' : 'cst-keypool-unavailable'}">
            <td><code>${escape(key.key)}</code></td>
            <td>${money(key.balance)}</td>
            <td>${money(key.used)}</td>
        </tr>`);
    field('keys').html(rows.length ? rows.join('') : `<tr><td colspan="3" class="cst-keypool-empty">${t`No keys in the pool`}</td></tr>`);
    field('updated').text(t`Updated ${new Date().toLocaleTimeString()}`);
}

// One bar: used / limit; hidden when there is no limit
function meter(name, used, limit, spent) {
    const bar = field(`${name}-meter`);
    const limited = typeof limit === 'number';
    bar.toggle(limited);
    field(`${name}-limit`).text(limited ? ` / ${count(limit)}` : '');
    if (!limited) {
        return;
    }
    const ratio = limit > 0 ? Math.min(used / limit, 1) : 1;
    bar.attr({ 'aria-valuemax': limit, 'aria-valuenow': Math.min(used, limit), 'data-level': spent ? 'spent' : ratio >= 0.8 ? 'high' : 'ok' });
    bar.find('span').css('width', `${(ratio * 100).toFixed(1)}%`);
}

// This instance's use against its budget: usage {window, today, month, budget, left} from the proxy's
// ledger, relayed by the plugin
function renderUsage(data) {
    const usage = data.usage ?? null;
    const today = usage?.today ?? null;
    const month = usage?.month ?? null;
    const budget = usage?.budget ?? null;
    const left = usage?.left ?? null;
    const tokens = part => part?.tokens ?? 0;
    field('usage').toggle(Boolean(usage));
    field('requests').text(count(today?.requests ?? 0));
    field('tokens').text(count(tokens(today)));
    field('month').toggle(Boolean(month));
    field('month-requests').text(count(month?.requests ?? 0));
    field('month-tokens').text(count(tokens(month)));
    const spentDay = typeof budget?.tokens_per_day === 'number' && left?.tokens_per_day === 0;
    const spentMonth = typeof budget?.tokens_per_month === 'number' && left?.tokens_per_month === 0;
    const spentMinute = typeof budget?.requests_per_minute === 'number' && left?.requests_per_minute === 0;
    meter('day', tokens(today), budget?.tokens_per_day, spentDay);
    meter('month', tokens(month), budget?.tokens_per_month, spentMonth);
    const win = usage?.window;
    field('zone').text(win?.timezone ? t`Days in ${win.timezone}` : '');
    const limits = [];
    if (usage && !budget) {
        limits.push(t`No limit`);
    } else if (typeof budget?.requests_per_minute === 'number') {
        limits.push(t`At most ${count(budget.requests_per_minute)} requests a minute`);
    }
    field('limits').text(limits.join(' · ')).toggle(limits.length > 0);
    const spent = [];
    if (spentMonth) {
        spent.push(t`This month's token budget is used up: chats resume on ${wallTime(win?.resets?.month)}.`);
    } else if (spentDay) {
        spent.push(t`Today's token budget is used up: chats resume on ${wallTime(win?.resets?.day)}.`);
    }
    if (spentMinute) {
        spent.push(t`The requests-per-minute limit is reached: wait a minute.`);
    }
    field('spent').text(spent.join(' ')).toggle(spent.length > 0);
    field('day').attr('data-spent', spentDay || spentMonth ? 'yes' : null);
    field('month').attr('data-spent', spentMonth ? 'yes' : null);
}

async function refresh() {
    if (loading) {
        return loading;
    }
    loading = load().finally(() => { loading = null; });
    return loading;
}

async function load() {
    const button = $('#cst_keypool [data-cst-action="refresh"]');
    button.addClass('disabled');
    try {
        const answer = await fetch(POOL_URL, { headers: getRequestHeaders() });
        if (!answer.ok) {
            throw new Error(`HTTP ${answer.status}`);
        }
        render(await answer.json());
    } catch (error) {
        showState('down', t`Could not load the pool status`);
        field('state').attr('title', String(error));
    } finally {
        button.removeClass('disabled');
    }
}

jQuery(async () => {
    $('#extensions_settings2').append(panelHtml());
    $('#cst_keypool [data-cst-action="refresh"]').on('click', refresh);
    $('#cst_keypool [data-cst-action="copy"]').on('click', async () => {
        await copyText(proxyUrl);
        toastr.success(t`Copied`);
    });
    $('#cst_keypool .inline-drawer-toggle').on('click', () => refresh());
    // each answer the pool served counts against the budget: show the new numbers
    eventSource.on(event_types.MESSAGE_RECEIVED, () => refresh());
    await refresh();
});
