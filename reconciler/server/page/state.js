// @ts-check
// What more than one view reads: the instances' rows (made by the instances view, gone over by the
// logs, usage and file views), the usage polled by the usage view (shown in the rows too), the
// desired file and the status (the file view's, and where each row's instance is in the file).
// What only one view uses stays in its module.

export const state = {
  /** @type {Map<string, import('./views/instances.js').Row>} instance id -> its row */
  rows: new Map(),
  archiveDir: '',
  /** @type {import('./api.js').Status | null} GET /api/status */
  status: null,
  /** @type {import('./api.js').Desired | null} GET /api/desired (with its `git`) */
  desired: null,
  /** @type {import('./api.js').Usage | null} GET /api/usage */
  usage: null,
  usageAt: 0,          // when it was fetched
};
