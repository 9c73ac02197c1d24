// The key pool panel in SillyTavern's extension settings: the successor of the DaiDai API
// Aggregator's panel, reading everything from CST's server plugin (/api/plugins/cst/pool), which
// relays the local proxy's status with this instance's own key. Keys arrive masked; the page never
// sees a whole key and never talks to the proxy itself. Text follows SillyTavern's language
// (i18n/zh-cn.json for Chinese).
import { getRequestHeaders } from '../../../../script.js';
import { t } from '../../../i18n.js';
import { copyText } from '../../../utils.js';

const POOL_URL = '/api/plugins/cst/pool';
let proxyUrl = '';

function escape(text) {
    return String(text).replace(/[&<>"']/g, c => `&#${c.charCodeAt(0)};`);
}

function money(value) {
    return value === null || value === undefined ? '—' : `¥${Number(value).toFixed(2)}`;
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
            <div class="cst-keypool-mine">
                <span class="cst-keypool-label">${t`This instance today`}</span>
                <span><b data-cst="requests">0</b> ${t`requests`} · <b data-cst="tokens">0</b> ${t`tokens`}</span>
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
    const today = data.instance?.today;
    field('requests').text(today ? today.requests : 0);
    field('tokens').text(today ? today.prompt_tokens + today.completion_tokens : 0);
    const rows = (pool?.keys ?? []).map(key => `
        <tr class="${key.available ? '' : 'cst-keypool-unavailable'}">
            <td><code>${escape(key.key)}</code></td>
            <td>${money(key.balance)}</td>
            <td>${money(key.used)}</td>
        </tr>`);
    field('keys').html(rows.length ? rows.join('') : `<tr><td colspan="3" class="cst-keypool-empty">${t`No keys in the pool`}</td></tr>`);
    field('updated').text(t`Updated ${new Date().toLocaleTimeString()}`);
}

async function refresh() {
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
    await refresh();
});
