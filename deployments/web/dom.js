// Two DOM helpers. Text goes in as text nodes: nothing user-supplied is ever parsed as HTML.

export const $ = (selector) => document.querySelector(selector);

/** el("p", {className: "x", dataset: {id: 1}}, "text", child) */
export function el(tag, { dataset = {}, ...props } = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  Object.assign(node.dataset, dataset);
  node.append(...children);
  return node;
}
