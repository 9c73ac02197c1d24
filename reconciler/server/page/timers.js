// @ts-check
// Waiting, and gathering a burst of calls into one

/** @param {number} ms */
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** @type {Map<() => unknown, number>} */
const pending = new Map();

/**
 * Call load in ms, once however often this is called before then: a burst of events makes one request
 * @param {() => unknown} load
 * @param {number} [ms]
 */
export function later(load, ms = 150) {
  clearTimeout(pending.get(load));
  pending.set(load, setTimeout(load, ms));
}
