// @ts-check
// Talking to CST's REST API: the admin key in a header on every call (never in a URL), the
// chosen language in Accept-Language, errors as ApiError with the API's own message. The
// documents the page reads are described here as far as it reads them (schemas/openapi.json
// has them whole).
import { lang, t } from './i18n.js';

/**
 * @typedef {object} Tally  a caller's requests and tokens in a day or a month
 * @property {number} requests
 * @property {number} errors
 * @property {number} tokens
 * @property {number} [estimated]  requests whose tokens the proxy estimated
 *
 * @typedef {object} Budget  a limit of each kind, or what is left of it; null: none of that kind
 * @property {number | null} [tokens_per_day]
 * @property {number | null} [tokens_per_month]
 * @property {number | null} [requests_per_minute]
 *
 * @typedef {object} CallerUsage  GET /api/usage's entry of one caller, or what an instance row says
 * @property {Tally} [today]
 * @property {Tally} [month]
 * @property {Budget | null} [budget]
 * @property {Budget | null} [left]
 *
 * @typedef {object} Instance  a row of GET /api/instances (a server of the seed's says only status)
 * @property {string} id
 * @property {number} port
 * @property {string} [url]
 * @property {'online' | 'stopped' | 'errored'} status
 * @property {string} [observed]  running, parked, stopped, crashed, port-taken, errored
 * @property {'running' | 'stopped' | 'absent'} [desired]
 * @property {string} [detail]
 * @property {string} dataDir
 * @property {number | null} [uptime]
 * @property {number} restarts
 * @property {number | null} [memory]
 * @property {number | null} [disk]
 * @property {number | null} [parkAfter]
 * @property {{at: string, reason: string} | null} [lastFailure]
 * @property {{today?: Tally, month?: Tally} | null} [usage]
 * @property {Budget | null} [budget]
 * @property {Budget | null} [left]
 *
 * @typedef {object} Problem  a problem of the desired file
 * @property {number} line
 * @property {string} [path]
 * @property {string} message
 * @property {string} text
 *
 * @typedef {object} Status  GET /api/status, as far as the page reads it
 * @property {{problems: Problem[]}} file
 * @property {{lastRun: string | null, durationMs: number, recap: Record<string, number>,
 *   results: {id: string, outcome: string, detail?: string}[], failure?: string | null,
 *   rollout?: Record<string, unknown> | null}} reconcile
 * @property {{archiveDir: string}} daemon
 *
 * @typedef {object} Commit
 * @property {string} hash
 * @property {string} short
 * @property {string} author
 * @property {string} message
 * @property {string} when
 *
 * @typedef {{kind: string, message: string}} Outcome
 *
 * @typedef {object} Git  where desired.yaml is in git
 * @property {string | null} [root]
 * @property {string} [file]
 * @property {boolean} [clean]
 * @property {Commit | null} [head]
 * @property {Commit[]} [recent]
 * @property {string | null} [problem]
 * @property {{remote: string, branch: string, every: number, push: boolean} | null} [following]
 * @property {{kind: string, message: string, at: string} | null} [lastCommit]
 * @property {{at: string, outcomes: Outcome[], problem?: Outcome | null} | null} [lastSync]
 *
 * @typedef {object} Desired  GET /api/desired
 * @property {string} path
 * @property {string} text
 * @property {boolean} valid
 * @property {Record<string, {from: number, to: number}>} instances  where each instance is written
 * @property {Git | null} [git]
 *
 * @typedef {object} Key  a key of the pool, masked
 * @property {string} key
 * @property {boolean} available
 * @property {number | null} [balance]
 * @property {number | null} [used]
 * @property {number} requests
 * @property {number} failures
 * @property {string | null} [cooldown_until]
 *
 * @typedef {object} Account
 * @property {string} provider
 * @property {string} state  ok, error, pending
 * @property {string | null} [last_error]
 * @property {string | null} [last_refresh]
 * @property {boolean} [from_cache]
 * @property {number} [balance]
 * @property {Key[]} keys
 *
 * @typedef {object} Pool  GET /api/pool, and the event stream's pool event
 * @property {boolean} running
 * @property {string | null} url
 * @property {number} totalBalance
 * @property {{total: number, available: number}} keys
 * @property {Record<string, Account>} accounts
 *
 * @typedef {object} Usage  GET /api/usage
 * @property {{timezone: string, day: string, month: string, resets?: {day?: string, month?: string}}} window
 * @property {Record<string, CallerUsage>} [instances]
 *
 * @typedef {object} History  GET /api/usage?from=&to=: daily totals, by day then caller
 * @property {string} from
 * @property {string} to
 * @property {{day: string, instance: string, tokens: number}[]} days
 *
 * @typedef {object} ServerEvent  an event of GET /api/events; data as sent, parsed (each kind says its own)
 * @property {string | null} id
 * @property {string} event
 * @property {unknown} data
 */

const KEY = 'cst-admin-key';  // sessionStorage: this tab only, gone when it closes

export const session = {
  /** @returns {string | null} */
  get key() { return sessionStorage.getItem(KEY); },
  /** @param {string | null} value */
  set key(value) { value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY); },
};

export class ApiError extends Error {
  /**
   * @param {number} status
   * @param {string} message
   * @param {number} [retryAfter]
   */
  constructor(status, message, retryAfter = 0) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;  // seconds, for 429
  }
}

/**
 * What a failed call shows: the API's own message, else why the API did not answer
 * @param {unknown} error
 */
export function failureText(error) {
  if (error instanceof ApiError) return error.message;
  return t('err.network', { reason: error instanceof Error ? error.message : String(error) });
}

/**
 * @param {Record<string, string>} [extra]
 * @param {string | null} [key]
 * @returns {Record<string, string>}
 */
function headers(extra = {}, key = session.key) {
  return { 'X-ST-Admin-Key': key || '', 'Accept-Language': lang(), ...extra };
}

/** @param {Response} response */
async function failure(response) {
  let message = response.statusText || `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && typeof body.error === 'string') message = body.error;
  } catch { /* not JSON: keep the status text */ }
  const wait = parseInt(response.headers.get('Retry-After') || '', 10);
  return new ApiError(response.status, message, Number.isFinite(wait) ? wait : 0);
}

/**
 * @typedef {object} CallOptions
 * @property {unknown} [body]  sent as JSON
 * @property {string} [key]  instead of the session's (signing in)
 * @property {AbortSignal} [signal]
 * @property {Record<string, string>} [extraHeaders]
 */

/**
 * fetch() an /api/ path (relative, so the page also works behind a path prefix); the Response
 * @param {'GET' | 'POST' | 'DELETE'} method
 * @param {string} path
 * @param {CallOptions} [options]
 */
export async function call(method, path, { body, key, signal, extraHeaders } = {}) {
  /** @type {RequestInit & {headers: Record<string, string>}} */
  const init = { method, headers: headers(extraHeaders, key), signal };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers['Content-Type'] = 'application/json';
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response;
}

/**
 * The answer's JSON document: the caller says what it is (the types above)
 * @param {'GET' | 'POST' | 'DELETE'} method
 * @param {string} path
 * @param {CallOptions} [options]
 * @returns {Promise<unknown>}
 */
export async function json(method, path, options) {
  return (await call(method, path, options)).json();
}

/**
 * The chunks of a streamed text body, decoded, as they arrive
 * @param {Response} response
 * @returns {AsyncGenerator<string>}
 */
export async function* textChunks(response) {
  if (!response.body) return;  // an answer with no body at all (not one of CST's)
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      yield value;
    }
  } finally {
    reader.releaseLock();
  }
}

/**
 * Server-sent events read from a fetch() body: {id, event, data} with data parsed as JSON
 * @param {Response} response
 * @returns {AsyncGenerator<ServerEvent>}
 */
export async function* serverEvents(response) {
  let buffer = '';
  for await (const chunk of textChunks(response)) {
    buffer += chunk;
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      /** @type {{id: string | null, event: string, data: string}} */
      const event = { id: null, event: 'message', data: '' };
      for (const line of block.split('\n')) {
        if (!line || line.startsWith(':')) continue;  // a comment: the keep-alive
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'data') event.data += (event.data ? '\n' : '') + value;
        else if (field === 'id' || field === 'event') event[field] = value;
      }
      if (event.id === null && !event.data) {
        yield { id: null, event: 'comment', data: {} };  // a keep-alive: the stream is still there
        continue;
      }
      yield { ...event, data: event.data ? JSON.parse(event.data) : {} };
    }
  }
}
