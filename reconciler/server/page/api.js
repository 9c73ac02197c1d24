// Talking to CST's REST API: the admin key in a header on every call (never in a URL), the
// chosen language in Accept-Language, errors as ApiError with the API's own message.
import { lang } from './i18n.js';

const KEY = 'cst-admin-key';  // sessionStorage: this tab only, gone when it closes

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  set key(value) { value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY); },
};

export class ApiError extends Error {
  constructor(status, message, retryAfter = 0) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;  // seconds, for 429
  }
}

function headers(extra = {}, key = session.key) {
  return { 'X-ST-Admin-Key': key || '', 'Accept-Language': lang(), ...extra };
}

async function failure(response) {
  let message = response.statusText || `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && typeof body.error === 'string') message = body.error;
  } catch { /* not JSON: keep the status text */ }
  const wait = parseInt(response.headers.get('Retry-After') || '', 10);
  return new ApiError(response.status, message, Number.isFinite(wait) ? wait : 0);
}

// fetch() an /api/ path (relative, so the page also works behind a path prefix); the Response
export async function call(method, path, { body, key, signal, extraHeaders } = {}) {
  const init = { method, headers: headers(extraHeaders, key), signal };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers['Content-Type'] = 'application/json';
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response;
}

export async function json(method, path, options) {
  return (await call(method, path, options)).json();
}

// The chunks of a streamed text body, decoded, as they arrive
export async function* textChunks(response) {
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

// Server-sent events read from a fetch() body: {id, event, data} with data parsed as JSON
export async function* serverEvents(response) {
  let buffer = '';
  for await (const chunk of textChunks(response)) {
    buffer += chunk;
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
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
