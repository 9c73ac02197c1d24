// @ts-check
// The event stream (GET /api/events): fetch() so the key travels in a header, reconnecting with
// Last-Event-ID, and the header's Live badge. What an event changes is app.js's to say.
import { ApiError, call, serverEvents } from './api.js';
import { $ } from './dom.js';
import { t } from './i18n.js';
import { sleep } from './timers.js';
import { signOut } from './views/signin.js';

const STALL_MS = 45000;  // the server comments every 15 s: this long without a byte means the stream is dead

/** @type {{stopped: boolean, controller: AbortController | null} | null} */
let current = null;
/** @type {boolean | null} shown as Live or Reconnecting; null before the first try */
let live = null;

/** @param {boolean} on */
function setLive(on) {
  live = on;
  $('live').textContent = t(on ? 'live.on' : 'live.off');
  $('live').className = `live ${on ? 'on' : 'off'}`;
}

export function relabelLive() {
  if (live !== null) setLive(live);
}

/** @param {(event: import('./api.js').ServerEvent) => void} onEvent */
export async function listen(onEvent) {
  stopStream();
  /** @type {{stopped: boolean, controller: AbortController | null}} */
  const stream = { stopped: false, controller: null };
  current = stream;
  /** @type {string | null} */
  let lastId = null;
  let delay = 1000;
  setLive(false);
  while (!stream.stopped) {
    const controller = new AbortController();
    stream.controller = controller;
    /** @type {number | undefined} */
    let timer;
    const arm = () => { clearTimeout(timer); timer = setTimeout(() => controller.abort(), STALL_MS); };
    try {
      arm();
      const response = await call('GET', 'api/events', {
        signal: controller.signal, extraHeaders: lastId ? { 'Last-Event-ID': lastId } : {},
      });
      setLive(true);
      delay = 1000;
      for await (const event of serverEvents(response)) {
        arm();
        if (event.id) lastId = event.id;
        onEvent(event);
      }
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        clearTimeout(timer);
        if (!stream.stopped) signOut(error.message);
        return;
      }
      if (error instanceof ApiError && error.status === 429) delay = Math.max(delay, error.retryAfter * 1000);
    } finally {
      clearTimeout(timer);
    }
    if (stream.stopped) return;
    setLive(false);
    await sleep(delay);
    delay = Math.min(delay * 2, 15000);
  }
}

export function stopStream() {
  if (!current) return;
  current.stopped = true;
  current.controller?.abort();
  current = null;
}
