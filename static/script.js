// Page-view and custom-event tracker. Include it with one tag:
// <script defer data-domain="example.com" src="https://analytics.example/js/script.js"></script>
// Options: data-api (endpoint), data-hash (the #fragment is the page, for hash routing),
// data-track-localhost, data-track-automation.
// Custom events: analytics("Signup", {props: {plan: "pro"}}). Opt out: localStorage.analytics_ignore = "true".
(function () {
  var w = window, loc = w.location, script = document.currentScript;
  var api = script.getAttribute("data-api") || new URL(script.src).origin + "/api/event";
  var domain = script.getAttribute("data-domain") || loc.hostname;
  var hashRouting = script.hasAttribute("data-hash");
  var lastPage;

  function ignoreReason() {
    try { if (w.localStorage.analytics_ignore === "true") return "opted out"; } catch (e) { /* storage blocked */ }
    var local = /^(localhost|127(\.\d+){3}|\[::1\])$/.test(loc.hostname) || loc.protocol === "file:";
    if (local && !script.hasAttribute("data-track-localhost")) return "localhost";
    var automated = navigator.webdriver || w._phantom || w.__nightmare || w.Cypress;
    if (automated && !script.hasAttribute("data-track-automation")) return "automation";
  }

  function send(name, options) {
    options = options || {};
    var reason = ignoreReason();
    if (reason) return console.warn("analytics: ignoring " + name + ": " + reason);
    var body = { n: name, u: loc.href, d: domain, r: document.referrer || null };
    if (hashRouting) body.h = 1;
    if (options.props) body.p = options.props;
    var done = options.callback || function () {};
    fetch(api, { method: "POST", headers: { "Content-Type": "text/plain" }, keepalive: true,
                 body: JSON.stringify(body) })
      .then(function (response) { done({ status: response.status }); }, function (error) { done({ error: error }); });
  }

  function pageview() {
    // only a new pathname (or fragment, with data-hash) is a new page
    var page = loc.pathname + (hashRouting ? loc.hash : "");
    if (page === lastPage) return;
    lastPage = page;
    send("pageview");
  }

  if (hashRouting) {
    w.addEventListener("hashchange", pageview);
  } else {
    var pushState = history.pushState;
    history.pushState = function () { pushState.apply(this, arguments); pageview(); };
    w.addEventListener("popstate", pageview);
  }
  // Back or Forward to a page kept in the browser's back/forward cache runs no script again,
  // yet the visitor sees the page once more
  w.addEventListener("pageshow", function (event) {
    if (event.persisted) { lastPage = null; pageview(); }
  });
  var queued = (w.analytics && w.analytics.q) || [];
  w.analytics = send;
  queued.forEach(function (args) { send.apply(null, args); });
  // a page prerendered or opened in a background tab is not seen until it is shown
  if (document.visibilityState === "visible") {
    pageview();
  } else {
    document.addEventListener("visibilitychange", function shown() {
      if (document.visibilityState !== "visible") return;
      document.removeEventListener("visibilitychange", shown);
      pageview();
    });
  }
})();
