// The dashboard: reads the same /stats* JSON endpoints anyone can call and shows
// their numbers as they are. The API key, when the server wants one, is kept in
// sessionStorage (or localStorage when remembered) and sent only in the
// Authorization header, never in a URL.
"use strict";

const KEY = "analytics_api_key";
const DAY = 86400000;
// the breakdown tables: element id = property; custom events are event types other than page views
const BREAKDOWNS = [
  {property: "source", name: "Source", empty: "Direct / none"},
  {property: "browser", name: "Browser", empty: "(unknown)"},
  {property: "os", name: "System", empty: "(unknown)"},
  {property: "device", name: "Device", empty: "(unknown)"},
  {property: "event_type", name: "Event", empty: "(none)", skip: "page_view", count: "events", label: "Events"},
];
const TOP = 10;
// a custom-event property is asked for as props.<name>; the API takes these names only
const PROP_NAME = /^[A-Za-z0-9_ .:-]{1,64}$/;
const PROP_NAMES = 100;     // the names offered as the property is typed
const $ = (id) => document.getElementById(id);
const number = new Intl.NumberFormat("en-US");
let generation = 0;     // answers to an older selection are dropped
let fragmentSite = null;  // the site named in the URL, chosen once the list is in
let lastReport = null;    // redrawn when the window is resized

class NeedKey extends Error {}

function storedKey() {
  return sessionStorage.getItem(KEY) || localStorage.getItem(KEY);
}

function forgetKey() {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
}

async function api(path, params) {
  const headers = {Accept: "application/json"};
  const key = storedKey();
  // keys are ASCII (the server refuses others); fetch would throw on one it cannot send
  if (key && !/^[\x21-\x7e]+$/.test(key)) throw new NeedKey();
  if (key) headers.Authorization = "Bearer " + key;
  const query = params ? "?" + new URLSearchParams(params) : "";
  let response;
  try {
    response = await fetch(path + query, {headers, cache: "no-store"});
  } catch (error) {
    // the browser's own words ("Failed to fetch") do not say what happened
    throw new Error("the server did not answer. Is it running, and is this computer online?");
  }
  if (response.status === 401) throw new NeedKey();
  let body = null;
  try { body = await response.json(); } catch (error) { /* not JSON: reported below */ }
  if (!response.ok || !body) {
    throw new Error((body && body.error) || `${path}: HTTP ${response.status}`);
  }
  return body;
}

// -- the selection: site and period, kept in the URL fragment ------------------

function isoDay(time) {
  return new Date(time).toISOString().slice(0, 10);
}

function period() {
  const choice = $("period").value;
  const today = Date.now();
  if (choice === "custom") return {from: $("from").value, to: $("to").value};
  const days = {today: 1, "7d": 7, "30d": 30}[choice];
  return {from: isoDay(today - (days - 1) * DAY), to: isoDay(today)};
}

function readFragment() {
  const state = new URLSearchParams(location.hash.slice(1));
  if (["today", "7d", "30d", "custom"].includes(state.get("period"))) $("period").value = state.get("period");
  if (state.get("from")) $("from").value = state.get("from");
  if (state.get("to")) $("to").value = state.get("to");
  $("prop").value = state.get("prop") || "";
  return state.get("site");
}

// a choice made on the page is a step in the history (Back undoes it); the page's own corrections are not
function writeFragment(push) {
  const state = {site: $("site").value, period: $("period").value};
  if (state.period === "custom") Object.assign(state, period());
  if ($("prop").value) state.prop = $("prop").value;
  const hash = "#" + new URLSearchParams(state);
  if (hash === location.hash) return;
  if (push) history.pushState(null, "", hash);
  else history.replaceState(null, "", hash);
}

// a bookmark opened on the page, an edited address or back/forward: show what the URL names
function followFragment() {
  const site = readFragment();
  $("range").hidden = $("period").value !== "custom";
  if (site === null) return;
  fragmentSite = site;
  if ([...$("site").options].some((option) => option.value === site)) $("site").value = site;
}

// -- drawing ------------------------------------------------------------------

// Anyone may send events, so a value may hold characters that draw nothing or reorder the text after
// them: "/\u202Egnp.exe" draws as /exe.png, "/log\u200Bin" or "/log\u2028in" as /login. Each is shown
// as its code point, and so are Hangul fillers, drawn as a blank. Zero-width (non-)joiners (U+200C,
// U+200D), variation selectors and tags stay: Persian, Indic scripts and emoji need them.
const HIDDEN = /[\0-\x1f\x7f-\x9f\xad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b\u200e\u200f\u2028\u2029\u202a-\u202e\u2060-\u206f\u3164\uffa0\ufeff\ufff9-\ufffc\u{1d173}-\u{1d17a}\u{e0001}]/gu;

function visible(value) {
  return value.replace(HIDDEN, (c) => `\u27e8U+${c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}\u27e9`);
}

function cell(tag, text, className) {
  const element = document.createElement(tag);
  element.textContent = text;
  if (className) element.className = className;
  return element;
}

// a path may be 2,048 characters: the cell shows three lines of it (dashboard.css), its tooltip all
function valueCell(value) {
  const text = visible(value);
  const element = cell("td", "");
  element.append(cell("span", text, "value"));
  element.title = text;
  return element;
}

function fillTable(table, heading, rows, emptyText = "Nothing in this period") {
  const head = document.createElement("tr");
  heading.forEach((text) => head.append(cell("th", text)));
  table.replaceChildren(head);
  for (const row of rows) {
    const line = document.createElement("tr");
    line.append(valueCell(row[0]), ...row.slice(1).map((n) => cell("td", number.format(n))));
    table.append(line);
  }
  if (!rows.length) {
    const line = document.createElement("tr");
    const empty = cell("td", emptyText, "empty");
    empty.colSpan = heading.length;
    line.append(empty);
    table.append(line);
  }
}

// coordinates to a tenth of a pixel: finer ones draw the same and only make the markup long
function svg(tag, attributes, text) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes)) {
    element.setAttribute(name, typeof value === "number" ? Math.round(value * 10) / 10 : value);
  }
  if (text !== undefined) element.textContent = text;
  return element;
}

// a round top for the scale: 1, 2 or 5 times a power of ten
function scaleTop(value) {
  if (value <= 4) return 4;
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 5, 10].map((step) => step * power).find((top) => top >= value);
}

function drawChart(points, hourly) {
  const box = $("chart");
  const width = Math.max(box.clientWidth, 280), height = 220;
  const left = 36, right = 8, top = 10, bottom = 24;
  const plotWidth = width - left - right, plotHeight = height - top - bottom;
  const highest = scaleTop(Math.max(0, ...points.map((p) => Math.max(p.views, p.unique_users))));
  const slot = plotWidth / points.length;
  const x = (i) => left + slot * (i + 0.5);
  const y = (value) => top + plotHeight * (1 - value / highest);
  const chart = svg("svg", {viewBox: `0 0 ${width} ${height}`, role: "img",
                            "aria-label": "Views and unique users over the period"});
  for (const value of [0, highest / 2, highest]) {
    chart.append(svg("line", {class: "grid", x1: left, x2: width - right, y1: y(value), y2: y(value)}));
    chart.append(svg("text", {x: left - 6, y: y(value) + 4, "text-anchor": "end"}, number.format(value)));
  }
  const every = Math.ceil(points.length / Math.max(2, Math.floor(plotWidth / 64)));
  points.forEach((point, i) => {
    const label = hourly ? point.date.slice(11, 16) : point.date.slice(5);
    const bar = svg("rect", {class: "bar", x: x(i) - slot * 0.35, width: Math.max(slot * 0.7, 1),
                             y: y(point.views), height: plotHeight * point.views / highest});
    bar.append(svg("title", {}, `${point.date}: ${number.format(point.views)} views, ` +
                               `${number.format(point.unique_users)} unique users`));
    chart.append(bar);
    if (i % every === 0) {
      chart.append(svg("text", {x: x(i), y: height - 6, "text-anchor": "middle"}, label));
    }
  });
  const line = points.map((point, i) => `${x(i).toFixed(1)},${y(point.unique_users).toFixed(1)}`);
  chart.append(svg("polyline", {class: "users", points: line.join(" ")}));
  if (points.length <= 31) {
    points.forEach((point, i) => chart.append(svg("circle", {class: "dot", cx: x(i), cy: y(point.unique_users), r: 3})));
  }
  box.replaceChildren(chart);
}

function show(report) {
  $("report").hidden = false;       // first: a hidden chart box has no width to draw to
  $("views").textContent = number.format(report.stats.total_views);
  $("users").textContent = number.format(report.stats.unique_users);
  $("chart-title").textContent = `Views and unique users ${report.hourly ? "by hour" : "by day"}`;
  drawChart(report.series.points, report.hourly);
  // what the chart draws, as a table for those who do not see it
  fillTable($("chart-data"), [report.hourly ? "Hour" : "Day", "Views", "Unique users"],
            report.series.points.map((point) => [point.date, point.views, point.unique_users]));
  fillTable($("paths"), ["Path", "Views"], report.stats.top_paths.map((row) => [row.path, row.views]));
  BREAKDOWNS.forEach((breakdown, i) => {
    const rows = report.breakdowns[i].results.filter((row) => row.value !== breakdown.skip).slice(0, TOP);
    fillTable($(breakdown.property), [breakdown.name, breakdown.label || "Views", "Users"],
              valueRows(rows, breakdown.empty, breakdown.count || "views"));
  });
  showProps(report.prop, report.props, report.names);
  lastReport = report;
  $("report").removeAttribute("aria-busy");
  document.body.dataset.state = "shown";     // for tests and scripts: every number is in place
}

function valueRows(results, empty, count) {
  return results.map((row) => [row.value === null ? empty : row.value, row[count], row.unique_users]);
}

// props: the breakdown of props.<prop>, or null when prop is no name the API takes
function showProps(prop, props, names) {
  $("prop-names").replaceChildren(...names.map((name) => Object.assign(document.createElement("option"), {value: name})));
  if (props) {
    fillTable($("props"), [prop, "Events", "Users"], valueRows(props.results, "(empty)", "events"));
  } else {
    fillTable($("props"), ["Value", "Events", "Users"], [],
              prop ? "A property name is 1 to 64 letters, digits, spaces or _ . : -"
                   : names.length ? `Name a property to see its values: ${names.slice(0, TOP).join(", ")}`
                   : "No event in this period was sent with properties (props)");
  }
}

// -- loading ------------------------------------------------------------------

function say(text) {
  $("status").textContent = text;
}

// numbers that are not those of the chosen site and period are not shown
function withdraw(text, state) {
  say(text);
  $("report").hidden = true;
  $("report").removeAttribute("aria-busy");
  document.body.dataset.state = state;
}

async function loadReport(push) {
  const current = ++generation;
  const site = $("site").value;
  const {from, to} = period();
  if (!site) return;
  if (!from || !to || from > to) {
    withdraw("Choose a range whose start is not after its end.", "invalid");
    return;
  }
  writeFragment(push === true);
  // until the answers come, the numbers shown are another selection's: dimmed, not passed off as these
  $("report").setAttribute("aria-busy", "true");
  document.body.dataset.state = "loading";
  const hourly = from === to;
  const base = {site_id: site, from, to};
  const prop = $("prop").value;
  try {
    const [stats, series, names, props, ...breakdowns] = await Promise.all([
      api("stats", {...base, limit: TOP}),
      api("stats/timeseries", {...base, interval: hourly ? "hour" : "day"}),
      api("stats/props", {...base, limit: PROP_NAMES}),
      PROP_NAME.test(prop) ? api("stats/breakdown", {...base, property: "props." + prop, limit: TOP}) : null,
      ...BREAKDOWNS.map((b) => api("stats/breakdown", {...base, property: b.property, limit: TOP + (b.skip ? 1 : 0)})),
    ]);
    if (current !== generation) return;
    say("");
    show({stats, series, breakdowns, hourly, prop, props, names: names.props});
  } catch (error) {
    if (current === generation) failed(error);
  }
}

async function loadSites() {
  const wanted = $("site").value || fragmentSite;
  const {sites} = await api("stats/sites");
  const picker = $("site");
  picker.replaceChildren(...sites.map((site) => {
    const option = cell("option", visible(site.site_id));
    option.value = site.site_id;      // without it, the value is the text with its spaces collapsed
    return option;
  }));
  if (!sites.length) {
    withdraw("No data yet: send events to POST /event, or add the tracker script /js/script.js to a page.",
             "empty");
    return false;
  }
  picker.value = sites.some((site) => site.site_id === wanted) ? wanted : sites[0].site_id;
  return true;
}

function failed(error) {
  if (error instanceof NeedKey) {
    const refused = storedKey() !== null;
    forgetKey();
    $("forget").hidden = true;      // nothing left to forget
    $("key-reason").textContent = refused ? "That API key was refused. Enter a valid one."
                                          : "This server asks for an API key to read its reports.";
    withdraw("", "key");
    $("key-form").hidden = false;
    $("key").focus();
  } else {
    withdraw("Could not load the reports: " + error.message, "failed");
  }
}

async function start() {
  $("key-form").hidden = true;
  $("forget").hidden = storedKey() === null;
  try {
    if (await loadSites()) await loadReport();
  } catch (error) {
    failed(error);
  }
}

function init() {
  fragmentSite = readFragment();
  $("range").hidden = $("period").value !== "custom";
  const today = isoDay(Date.now());
  if (!$("from").value) $("from").value = isoDay(Date.now() - 6 * DAY);
  if (!$("to").value) $("to").value = today;
  $("site").addEventListener("change", () => loadReport(true));
  $("period").addEventListener("change", () => {
    $("range").hidden = $("period").value !== "custom";
    loadReport(true);
  });
  $("from").addEventListener("change", () => loadReport(true));
  $("to").addEventListener("change", () => loadReport(true));
  window.addEventListener("hashchange", () => {
    followFragment();
    loadReport();
  });
  $("controls").addEventListener("submit", (event) => event.preventDefault());
  $("prop").addEventListener("change", () => loadReport(true));
  $("prop-form").addEventListener("submit", (event) => event.preventDefault());
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const storage = $("remember").checked ? localStorage : sessionStorage;
    storage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    // the form hides itself: focus moves to the first control rather than back to the top of the page
    start().then(() => { if ($("key-form").hidden) $("site").focus(); });
  });
  $("forget").addEventListener("click", () => {
    forgetKey();
    location.reload();
  });
  let pending = false;
  window.addEventListener("resize", () => {
    if (pending || !lastReport) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      drawChart(lastReport.series.points, lastReport.hourly);
    });
  });
  start();
}

init();
