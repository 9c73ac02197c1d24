// @ts-check
// The logs view: an instance's log, its last lines and then followed as it grows
import { call, textChunks } from '../api.js';
import { $, byId, el } from '../dom.js';
import { t } from '../i18n.js';
import { handle } from '../messages.js';
import { state } from '../state.js';
import { loadInstances } from './instances.js';

const view = {
  /** @type {AbortController | null} */
  controller: null,
  logState: '',        // the badge's text's key
  length: 0,           // the characters shown
};

const chooser = () => byId('log-instance', HTMLSelectElement);

export function fillLogChoices() {  // one option an instance, the chosen one kept
  const select = chooser();
  const chosen = select.value;
  const ids = [...state.rows.keys()];
  if ([...select.options].map((o) => o.value).join() !== ids.join()) {
    select.replaceChildren(...ids.map((id) => el('option', { value: id }, id)));
    if (ids.includes(chosen)) select.value = chosen;
  }
}

/** @param {string} key */
function setLogState(key) {
  view.logState = key;
  $('log-state').textContent = key ? t(key) : '';
  $('log-state').className = `badge ${key === 'logs.live' ? 's-online' : ''}`;
}

export function relabelLogs() {
  setLogState(view.logState);
}

export function stopLogs() {
  view.controller?.abort();
  view.controller = null;
}

/** @param {string} [id]  the instance to show, else the one chosen */
export async function showLogs(id) {
  if (id) {
    if (!state.rows.has(id)) await loadInstances();
    chooser().value = id;
  }
  stopLogs();
  const chosen = chooser().value;
  const text = $('log-text');
  text.textContent = '';
  view.length = 0;
  if (!chosen) return setLogState('logs.empty');
  const controller = new AbortController();
  view.controller = controller;
  const follow = byId('log-follow', HTMLInputElement).checked;
  const lines = Math.min(Math.max(parseInt(byId('log-lines', HTMLInputElement).value, 10) || 0, 0), 10000);
  setLogState('logs.loading');
  try {
    const response = await call('GET',
      `api/instances/${encodeURIComponent(chosen)}/logs?tail=${lines}&follow=${follow ? 1 : 0}`,
      { signal: controller.signal });
    setLogState(follow ? 'logs.live' : 'logs.ended');
    for await (const chunk of textChunks(response)) appendLog(chunk);
    setLogState('logs.ended');
  } catch (error) {
    if (controller.signal.aborted) return;
    setLogState('logs.ended');
    handle(error);
  }
}

/** @param {string} chunk */
function appendLog(chunk) {
  const text = $('log-text');
  const atEnd = text.scrollHeight - text.scrollTop - text.clientHeight < 40;
  text.append(chunk);
  view.length += chunk.length;
  if (view.length > 2_000_000) {  // a log followed for days: keep its last megabyte
    text.textContent = (text.textContent ?? '').slice(-1_000_000);
    view.length = text.textContent.length;
  }
  if (atEnd) text.scrollTop = text.scrollHeight;
}

export function wireLogs() {
  chooser().addEventListener('change', () => { location.hash = `#logs/${chooser().value}`; });
  $('log-reload').addEventListener('click', () => showLogs());
  $('log-follow').addEventListener('change', () => showLogs());
}
