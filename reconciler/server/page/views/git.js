// @ts-check
// The desired file's place in git, in the file view: the commit that runs, the last commits, the
// branch followed, and what went wrong
import { $, el } from '../dom.js';
import { moment, period, stamp } from '../format.js';
import { t } from '../i18n.js';

/**
 * @typedef {import('../api.js').Commit} Commit
 * @typedef {import('../api.js').Git} Git
 * @typedef {{label: string, message: string, when?: string}} Warning
 */

let warningsShown = '';  // the warnings shown, so an unchanged set is not announced again

/** @param {Commit} commit */
function commitLine(commit) {
  return el('span', { class: 'commit' },
    el('span', { class: 'commit-what' }, el('code', { title: commit.hash }, commit.short), ' ',
      el('span', { class: 'commit-message' }, commit.message)),
    el('span', { class: 'commit-meta' }, `${commit.author} · `,
      el('time', { datetime: commit.when, title: commit.when }, moment(commit.when))));
}

// what is wrong, each with the server's own message (in English) under a label in the page's language
/** @param {Git} git */
function gitWarnings(git) {
  /** @type {Warning[]} */
  const warnings = [];
  if (git.problem) warnings.push({ label: t('git.warn.problem'), message: git.problem });
  const sync = git.lastSync?.problem;
  if (sync && sync.message !== git.problem) {
    const key = `git.warn.sync.${sync.kind}`;
    warnings.push({ label: t(key) === key ? t('git.warn.sync') : t(key), message: sync.message,
      when: t('git.warn.tried', { at: stamp(git.lastSync?.at) }) });
  }
  const commit = git.lastCommit;
  if (commit && commit.kind !== 'committed') {
    warnings.push({ label: t('git.warn.commit'), message: commit.message,
      when: t('git.warn.edit', { at: stamp(commit.at) }) });
  }
  return warnings;
}

/** @param {Git | null | undefined} git  GET /api/desired's: null when the file is in no work tree */
export function renderGit(git) {
  $('git-box').hidden = !git;
  const warnings = git ? gitWarnings(git) : [];
  const shown = JSON.stringify(warnings);
  if (shown !== warningsShown) {  // rebuilt (and announced) only when they change
    warningsShown = shown;
    $('git-warnings').replaceChildren(...warnings.map(({ label, message, when }) => el('div',
      { class: 'warning', role: 'alert' },
      el('strong', {}, label), el('span', { class: 'warning-message' }, message),
      when ? el('span', { class: 'small muted' }, when) : null)));
  }
  if (!git) return;
  $('git-repo').replaceChildren(git.root
    ? el('span', {}, el('code', {}, git.root), ` · ${git.file}`) : el('span', { class: 'muted' }, t('git.noRepo')));
  const dirty = git.clean === false;
  const badge = el('span', { class: `badge ${dirty ? 's-pending' : 's-ok'}`, title: dirty ? t('git.dirtyHint') : '' },
    t(dirty ? 'git.dirty' : 'git.clean'));
  // the badge only in a work tree (replaceChildren would show a null as the text "null")
  $('git-head').replaceChildren(git.head ? commitLine(git.head) : el('span', { class: 'muted' }, t('git.noCommit')),
    ...(git.root ? [badge] : []));
  const recent = git.recent || [];
  $('git-recent-row').hidden = recent.length === 0;
  $('git-recent').replaceChildren(...recent.map((commit) => el('li', {}, commitLine(commit))));
  const { following, lastSync } = git;
  $('git-following-row').hidden = !following;
  $('git-sync-row').hidden = !following;
  if (!following) return;
  $('git-following').replaceChildren(el('code', {}, `${following.remote}/${following.branch}`),
    ` · ${t('git.every', { every: period(following.every) })} · ${t(following.push ? 'git.push' : 'git.noPush')}`);
  $('git-sync').replaceChildren(lastSync
    ? el('span', {}, el('time', { datetime: lastSync.at }, stamp(lastSync.at)), ' · ',
      ...lastSync.outcomes.flatMap(({ kind }, index) => [index ? ', ' : '',
        el('span', { class: `git-${kind}` }, t(`git.outcome.${kind}`))]))
    : el('span', { class: 'muted' }, t('file.never')));
}
