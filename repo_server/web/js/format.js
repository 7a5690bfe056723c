// Small formatting and DOM helpers: human sizes, relative times, safe element building.

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

export function size(bytes) {
  if (bytes === null || bytes === undefined || Number.isNaN(bytes)) return "–";
  let value = Math.abs(bytes);
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) { value /= 1024; unit += 1; }
  const text = unit === 0 ? String(value) : value.toFixed(value < 10 ? 2 : value < 100 ? 1 : 0);
  return `${bytes < 0 ? "-" : ""}${text} ${UNITS[unit]}`;
}

export function rate(bytesPerSecond) {
  return bytesPerSecond ? `${size(bytesPerSecond)}/s` : "–";
}

export function ratio(x) {
  return x === null || x === undefined ? "–" : `${Number(x).toFixed(2)}×`;
}

const STEPS = [[60, "second"], [60, "minute"], [24, "hour"], [7, "day"], [4.345, "week"], [12, "month"],
  [Infinity, "year"]];
const RELATIVE = new Intl.RelativeTimeFormat("en", { numeric: "auto" });

// "3 minutes ago", "in 2 hours" for a unix time in seconds.
export function ago(unixSeconds) {
  if (!unixSeconds) return "never";
  let delta = unixSeconds - Date.now() / 1000;
  for (const [step, unit] of STEPS) {
    if (Math.abs(delta) < step) return RELATIVE.format(Math.round(delta), unit);
    delta /= step;
  }
  return "";
}

export function when(unixSeconds) {
  return unixSeconds ? new Date(unixSeconds * 1000).toLocaleString() : "";
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const m = Math.floor(seconds / 60);
  return m < 60 ? `${m} min ${Math.round(seconds % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

// Build an element: h("td", {class: "num", dataset: {x: 1}}, "text", child). Text is never parsed as HTML.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

// A time cell: relative text, the exact time on hover.
export function timeCell(unixSeconds) {
  return h("time", { datetime: unixSeconds ? new Date(unixSeconds * 1000).toISOString() : null,
    title: when(unixSeconds) }, ago(unixSeconds));
}

export function table(id, headings, rows, empty) {
  if (!rows.length) return h("p", { class: "empty", id: `${id}-empty` }, empty);
  return h("table", { id },
    h("thead", {}, h("tr", {}, headings.map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, rows));
}

export function badge(text, kind) {
  return h("span", { class: `badge ${kind ?? text}` }, text);
}
