// CST's server plugin for SillyTavern, mounted by SillyTavern under /api/plugins/cst/ when
// enableServerPlugins is on (CST starts every instance with SILLYTAVERN_ENABLESERVERPLUGINS=true).
// Its routes sit behind SillyTavern's own basic auth and login, like every /api route.
//
//   GET /api/plugins/cst/health  version, uptime, memory, data root: CST's readiness and liveness probe
//   GET /api/plugins/cst/pool    the key pool's status, relayed from CST's local proxy with this
//                                instance's own proxy key, so the browser never reaches the proxy;
//                                with this instance's use against its budget (the proxy's usage)
//
// Configuration comes from the environment CST starts the instance with:
//   CST_INSTANCE_ID      the instance's id (also its basic-auth user)
//   CST_PROXY_URL        the local proxy, e.g. http://127.0.0.1:5100 (unset: the instance has proxy: false)
//   CST_PROXY_KEY_FILE   the 0600 file holding this instance's proxy key; read on every relay, so a
//                        rotated key is used at once. The key itself is never sent to the browser.
import fs from 'node:fs';
import process from 'node:process';

const RELAY_TIMEOUT_MS = 5000;
const version = JSON.parse(fs.readFileSync(new URL('../../package.json', import.meta.url), 'utf8')).version;

export const info = {
    id: 'cst',
    name: 'CST',
    description: 'Health probe for CST, and the key pool status relayed from the CST proxy.',
};

function health(_request, response) {
    const memory = process.memoryUsage();
    response.json({
        status: 'ok',
        version,
        instance: process.env.CST_INSTANCE_ID ?? null,
        uptime: Math.round(process.uptime() * 1000) / 1000,
        memory: { rss: memory.rss, heapTotal: memory.heapTotal, heapUsed: memory.heapUsed, external: memory.external },
        dataRoot: globalThis.DATA_ROOT ?? null,
    });
}

const TALLY = ['requests', 'errors', 'prompt_tokens', 'completion_tokens', 'tokens', 'estimated'];
const LIMITS = ['tokens_per_day', 'tokens_per_month', 'requests_per_minute'];

function pick(object, names) {
    return object && typeof object === 'object' ? Object.fromEntries(names.map(name => [name, object[name] ?? null])) : null;
}

/** This instance's use against its budget, from the proxy's ledger (null from a proxy without one). */
function usageView(usage) {
    if (!usage || typeof usage !== 'object') {
        return null;
    }
    const win = usage.window ?? {};
    return {
        window: {
            timezone: win.timezone ?? null,
            day: win.day ?? null,
            month: win.month ?? null,
            resets: pick(win.resets, ['day', 'month']),
        },
        today: pick(usage.today, TALLY),
        month: pick(usage.month, TALLY),
        budget: pick(usage.budget, LIMITS),
        left: pick(usage.left, LIMITS),
    };
}

/** What the panel shows, picked field by field from the proxy's /status: masked keys only. */
function poolView(status, proxyUrl) {
    const keys = [];
    let balance = 0;
    let used = 0;
    for (const [account, entry] of Object.entries(status.accounts ?? {})) {
        for (const key of entry.keys ?? []) {
            balance += Number(key.balance ?? 0);
            used += Number(key.used ?? 0);
            keys.push({
                account,
                provider: entry.provider ?? null,
                key: String(key.key),
                balance: key.balance ?? null,
                used: key.used ?? null,
                available: Boolean(key.available),
            });
        }
    }
    return {
        proxy: { state: 'up', url: `${proxyUrl}/v1` },
        pool: {
            balance: Math.round(balance * 100) / 100,
            used: Math.round(used * 100) / 100,
            total: status.keys?.total ?? keys.length,
            available: status.keys?.available ?? keys.filter(k => k.available).length,
            keys,
        },
        instance: { id: process.env.CST_INSTANCE_ID ?? null },
        usage: usageView(status.usage),
    };
}

async function pool(_request, response) {
    const proxyUrl = process.env.CST_PROXY_URL;
    const keyFile = process.env.CST_PROXY_KEY_FILE;
    if (!proxyUrl || !keyFile) {
        return response.json({ proxy: { state: 'off', url: null } });
    }
    try {
        const key = (await fs.promises.readFile(keyFile, 'utf8')).trim();
        const answer = await fetch(`${proxyUrl}/status`, {
            headers: { Authorization: `Bearer ${key}` },
            signal: AbortSignal.timeout(RELAY_TIMEOUT_MS),
        });
        if (!answer.ok) {
            const body = await answer.json().catch(() => ({}));
            return response.json({
                proxy: { state: 'error', url: `${proxyUrl}/v1`, status: answer.status, message: body?.error?.message ?? answer.statusText },
            });
        }
        return response.json(poolView(await answer.json(), proxyUrl));
    } catch (error) {
        const reason = error?.name === 'TimeoutError' ? `no answer within ${RELAY_TIMEOUT_MS / 1000} s` : String(error?.cause?.code ?? error?.message ?? error);
        return response.json({ proxy: { state: 'down', url: `${proxyUrl}/v1`, message: reason } });
    }
}

export async function init(router) {
    router.get('/health', health);
    router.get('/pool', pool);
}
