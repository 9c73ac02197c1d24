// @ts-check
// Signing in and out: the key tried on GET /api/status, then kept in the tab's sessionStorage
// (api.js). What signing in starts and signing out stops is app.js's to say (onSession): the views
// stand on this module, not it on them.
import { ApiError, failureText, json, session } from '../api.js';
import { $, byId } from '../dom.js';
import { t } from '../i18n.js';

/** @typedef {import('../api.js').Status} Status */

const hooks = {
  /** @type {(status: Status) => void} */
  enter: () => {},
  leave: () => {},
};

/**
 * @param {(status: Status) => void} enter  signed in: start the views
 * @param {() => void} leave  signed out: stop them and hide them
 */
export function onSession(enter, leave) {
  hooks.enter = enter;
  hooks.leave = leave;
}

/** @type {number | undefined} */
let waitTimer;

export function showSignIn(message = '') {
  hooks.leave();
  $('signin').hidden = false;
  for (const id of ['tabs', 'signout', 'live']) $(id).hidden = true;
  $('signin-error').textContent = message;
  $('key').focus();
}

export function signOut(reason = '') {
  session.key = null;
  showSignIn(reason ? t('signin.out', { reason }) : '');
}

/** @param {SubmitEvent} event */
export async function signIn(event) {
  event.preventDefault();
  const field = byId('key', HTMLInputElement);
  const key = field.value;
  $('signin-error').textContent = '';
  try {
    const status = /** @type {Status} */ (await json('GET', 'api/status', { key }));
    session.key = key;
    field.value = '';
    enter(status);
  } catch (error) {
    if (error instanceof ApiError && error.status === 429) return waitToRetry(error);
    $('signin-error').textContent = failureText(error);
  }
}

// the API's brute-force limit: say so, count down, and let the button work again when it may
/** @param {ApiError} error */
export function waitToRetry(error) {
  const until = Date.now() + Math.max(error.retryAfter, 1) * 1000;
  const button = byId('signin-submit', HTMLButtonElement);
  button.disabled = true;
  const tick = () => {
    const left = Math.ceil((until - Date.now()) / 1000);
    if (left <= 0) {
      clearInterval(waitTimer);
      button.disabled = false;
      $('signin-error').textContent = '';
      return;
    }
    $('signin-error').textContent = `${error.message} ${t('signin.wait', { s: left })}`;
  };
  clearInterval(waitTimer);
  waitTimer = setInterval(tick, 250);
  tick();
}

/** @param {Status} status  the key's answer */
export function enter(status) {
  $('signin').hidden = true;
  for (const id of ['tabs', 'signout', 'live']) $(id).hidden = false;
  hooks.enter(status);
}

export function wireSignIn() {
  byId('signin-form', HTMLFormElement).addEventListener('submit', signIn);
  $('signout').addEventListener('click', () => signOut());
}
