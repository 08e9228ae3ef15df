// Building DOM without innerHTML: every value becomes a text node, so markup in data shows as text.

/** h("td", {class: "num"}, "12", child) → an element; props starting with "on" are listeners. */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = String(value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  add(el, children);
  return el;
}

/** Append children (nodes, strings, numbers, arrays; null skipped) as nodes or text. */
export function add(el, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** A form field: its label, then the input it names. */
export function field(id, text, input) {
  return h("div", {}, h("label", { for: id }, text), input);
}

/** Replace an element's content with `children`. */
export function fill(el, ...children) {
  el.replaceChildren();
  return add(el, children);
}

/** Set text only when it changed (cheap for live tables). */
export function setText(el, text) {
  const value = text === null || text === undefined ? "" : String(text);
  if (el.textContent !== value) el.textContent = value;
}

export function announce(message) {
  const region = document.getElementById("announcer");
  if (region) region.textContent = message;
}
