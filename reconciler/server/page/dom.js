// @ts-check
// The page's DOM helpers, shared by every view. Every text goes in through textContent or an
// attribute, never as HTML.

/**
 * One of the page's own elements, by id
 * @param {string} id
 * @returns {HTMLElement}
 */
export function $(id) {
  return kind(document.getElementById(id), HTMLElement, `#${id}`);
}

/**
 * One of the page's own elements, by id, of the kind the caller uses it as (an <input> for its
 * value): checked, so a wrong id or a changed index.html fails here rather than further on
 * @template {Element} T
 * @param {string} id
 * @param {new () => T} type
 * @returns {T}
 */
export function byId(id, type) {
  return kind(document.getElementById(id), type, `#${id}`);
}

/**
 * The first element under root that matches selector, of the given kind
 * @template {Element} T
 * @param {ParentNode} root
 * @param {string} selector
 * @param {new () => T} type
 * @returns {T}
 */
export function find(root, selector, type) {
  return kind(root.querySelector(selector), type, selector);
}

/**
 * @template {Element} T
 * @param {Element | null} node
 * @param {new () => T} type
 * @param {string} what
 * @returns {T}
 */
function kind(node, type, what) {
  if (!(node instanceof type)) throw new TypeError(`${what} is not a ${type.name}`);
  return node;
}

/**
 * @typedef {string | Record<string, string> | ((event: Event) => void)} Prop
 * @typedef {Record<string, Prop>} Props  class, dataset, on<event> or any attribute
 * @typedef {Node | string | null | undefined} Child  null and undefined are left out
 */

/**
 * A new element with its attributes, data-*, listeners and children
 * @template {keyof HTMLElementTagNameMap} K
 * @param {K} tag
 * @param {Props} [props]
 * @param {...Child} children
 * @returns {HTMLElementTagNameMap[K]}
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === 'class') node.className = String(value);
    else if (name === 'dataset' && typeof value === 'object') Object.assign(node.dataset, value);
    else if (name.startsWith('on') && typeof value === 'function') node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, String(value));
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

/**
 * @param {Node} node
 * @param {string} text
 */
export function setText(node, text) {  // a write that changes nothing would still make the page lay out again
  if (node.textContent !== text) node.textContent = text;
}
