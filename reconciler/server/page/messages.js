// @ts-check
// What the page tells the operator: toasts, the dialog, errors, and copying to the clipboard
import { ApiError, failureText } from './api.js';
import { $, byId, el } from './dom.js';
import { t } from './i18n.js';
import { signOut } from './views/signin.js';

/**
 * @param {string} text
 * @param {'info' | 'error'} [kind]
 */
export function toast(text, kind = 'info') {
  const item = el('div', { class: `toast ${kind}`, role: kind === 'error' ? 'alert' : 'status' },
    el('span', {}, text),
    el('button', { type: 'button', class: 'link', 'aria-label': t('close'), onclick: () => item.remove() }, '×'));
  $('toasts').append(item);
  setTimeout(() => item.remove(), kind === 'error' ? 15000 : 8000);
  return item;
}

/**
 * A failed call: a key no longer valid signs out, anything else is a toast (an aborted call nothing)
 * @param {unknown} error
 */
export function handle(error) {
  if (error instanceof ApiError && error.status === 401) signOut(error.message);
  else if (error instanceof ApiError && error.status === 429) {
    toast(t('err.wait', { message: error.message, s: error.retryAfter || 1 }), 'error');
  } else if (error instanceof ApiError) toast(error.message, 'error');
  else if (!(error instanceof Error && error.name === 'AbortError')) toast(failureText(error), 'error');
}

/**
 * @typedef {object} Question
 * @property {string} title
 * @property {string} text
 * @property {string} [ok]  the OK button's text
 * @property {boolean} [cancel]  whether there is a Cancel button
 * @property {string} [secret]  shown once, to be copied
 * @property {boolean} [danger]
 */

/**
 * The page's one modal dialog, after any that is open; whether it was answered OK
 * @param {Question} question
 * @returns {Promise<boolean>}
 */
export async function dialog({ title, text, ok = t('ok'), cancel = true, secret = '', danger = false }) {
  const box = byId('dialog', HTMLDialogElement);
  while (box.open) await new Promise((resolve) => box.addEventListener('close', resolve, { once: true }));
  const secretValue = byId('dialog-secret-value', HTMLInputElement);
  $('dialog-title').textContent = title;
  $('dialog-text').textContent = text;
  $('dialog-secret').hidden = !secret;
  secretValue.value = secret;
  $('dialog-ok').textContent = ok;
  $('dialog-ok').className = danger ? 'destroy' : 'primary';
  $('dialog-cancel').hidden = !cancel;
  return new Promise((resolve) => {
    let answer = false;
    const listening = new AbortController();
    $('dialog-ok').addEventListener('click', () => { answer = true; box.close(); }, { signal: listening.signal });
    $('dialog-cancel').addEventListener('click', () => box.close(), { signal: listening.signal });
    box.addEventListener('close', () => {
      listening.abort();
      secretValue.value = '';  // a password is shown once
      resolve(answer);
    }, { once: true });
    box.showModal();
    $(secret ? 'dialog-copy' : cancel ? 'dialog-cancel' : 'dialog-ok').focus();
  });
}

/**
 * @param {string} text
 * @param {HTMLElement} button  says "Copied" for a moment
 * @param {HTMLInputElement | null} [field]  where the text is shown, if it is
 */
export async function copy(text, button, field = null) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {  // no clipboard API outside a secure context (http to another host): select and copy
    const input = field || el('input', { value: text });
    if (!field) document.body.append(input);
    input.select();
    document.execCommand('copy');
    if (!field) input.remove();
  }
  button.textContent = t('copied');
  setTimeout(() => { button.textContent = t('copy'); }, 1500);
}
