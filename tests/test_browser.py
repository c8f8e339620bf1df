"""Browser traffic end to end: real trackers in headless Chromium, the real API and processor.

Pages in tests/browser/ load the official npm trackers (current and legacy) or
our own script tag from a site at http://example.test:PORT, which Chromium
resolves to this machine (trackers ignore localhost). They send to the API at
http://api.test:PORT, so every event is a cross-origin request like on a real
site. The API runs under gunicorn and the processor drains the queue into the
store; the reports must then show exactly what the page did.

Needs Debian's chromium and the npm packages: run .ci/provision-browser.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from config import ENVIRONMENT

REPO = Path(__file__).resolve().parent.parent
PAGES = Path(__file__).resolve().parent / "browser"
CHROMIUM = "/usr/bin/chromium"

TRACKER_FILES = [PAGES / "node_modules/@plausible-analytics/tracker/plausible.js",
                 PAGES / "node_modules/plausible-tracker/build/module/index.js"]

_missing = []
if not os.path.exists(CHROMIUM):
    _missing.append(f"Debian's chromium ({CHROMIUM})")
if not all(path.exists() for path in TRACKER_FILES):
    _missing.append("the npm trackers (tests/browser/node_modules)")
if _missing:
    pytest.skip(f"browser tests need {' and '.join(_missing)}: "
                "run .ci/provision-browser (installs Debian's chromium and the npm trackers)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="browser tests need playwright: pip install -r requirements-dev.txt")

pytestmark = pytest.mark.timeout(60)

SITE = "example.test"
CHROMIUM_ARGS = [
    # with no way out to the internet, Chromium's own background traffic (updates, sync,
    # first-run checks) would only fail and slow every start
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    f"--host-resolver-rules=MAP {SITE} 127.0.0.1, MAP api.test 127.0.0.1",
]
# Headless Chromium says "HeadlessChrome", which the API drops as a bot; a visitor's browser does not.
DESKTOP_CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
                  "Chrome/156.0.0.0 Safari/537.36")
UTM = "?utm_source=newsletter&utm_medium=spa"
START_TIMEOUT = 30.0
WAIT_TIMEOUT = 10.0


# -- the processes under test ---------------------------------------------------

def child_environment(data_dir):
    env = {name: value for name, value in os.environ.items() if name not in ENVIRONMENT}
    env["DATA_DIR"] = str(data_dir)
    return env


class Api:
    """gunicorn serving ingestion_api:app on a free loopback port, reached as http://api.test:PORT."""

    def __init__(self, tmp_path):
        self.data_dir = tmp_path / "data"
        self.data_dir.mkdir()
        self.log_path = tmp_path / "gunicorn.log"
        for _ in range(3):
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "gunicorn", "--workers", "1", "--threads", "4",
                     "--bind", f"127.0.0.1:{self.port}", "ingestion_api:app"],
                    cwd=REPO, env=child_environment(self.data_dir), stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log, start_new_session=True)
            if self._ready():
                self.url = f"http://127.0.0.1:{self.port}"
                self.public_url = f"http://api.test:{self.port}"
                return
            self.stop()     # most likely another process took the port meanwhile
        raise AssertionError("gunicorn did not start:\n" + self.log_tail())

    def _ready(self):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/health", timeout=2).ok:
                    return True
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        return False

    def log_tail(self):
        return self.log_path.read_text(errors="replace")[-3000:]

    def get(self, path, **params):
        response = requests.get(self.url + path, params=params, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def stats(self):
        return self.get("/stats", site_id=SITE)

    def breakdown(self, prop):
        return self.get("/stats/breakdown", site_id=SITE, property=prop)["results"]

    def drain(self):
        """Run processor.py --once: everything queued so far goes into the store."""
        result = subprocess.run([sys.executable, "processor.py", "--once"], cwd=REPO,
                                env=child_environment(self.data_dir), stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"processor --once exited {result.returncode}:\n{result.stderr[-3000:]}"

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PageHandler(SimpleHTTPRequestHandler):
    """tests/browser as a web site; {{api}} in a page becomes the API's address."""

    def __init__(self, *args, api_url, **kwargs):
        self.api_url = api_url
        super().__init__(*args, directory=str(PAGES), **kwargs)

    def send_head(self):
        if not urlsplit(self.path).path.endswith(".html"):
            return super().send_head()
        page = Path(self.translate_path(self.path))
        if not page.is_file():
            self.send_error(404)
            return None
        body = page.read_text().replace("{{api}}", self.api_url).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        return BytesIO(body)

    def log_message(self, format, *args):
        pass


class Site:
    def __init__(self, api_url):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(PageHandler, api_url=api_url))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, page, host=SITE):
        return f"http://{host}:{self.port}/{page}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# -- what a page did ------------------------------------------------------------

class Traffic:
    """Every request a page made to /api/event, with its answer, and what the console said."""

    def __init__(self, page):
        self.page = page
        self.events = []            # dicts: body, response status and headers, failure
        self.console = []           # (type, text)
        self.page_errors = []
        page.on("request", self._request)
        page.on("response", self._response)
        page.on("requestfailed", self._failed)
        page.on("console", lambda message: self.console.append((message.type, message.text)))
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))

    def _request(self, request):
        if urlsplit(request.url).path == "/api/event":
            self.events.append({"request": request, "body": json.loads(request.post_data),
                                "status": None, "headers": None, "failure": None})

    def _entry(self, request):
        return next((event for event in self.events if event["request"] is request), None)

    def _response(self, response):
        entry = self._entry(response.request)
        if entry is not None:
            entry["status"], entry["headers"] = response.status, response.headers

    def _failed(self, request):
        entry = self._entry(request)
        if entry is not None:
            entry["failure"] = request.failure

    def bodies(self):
        return [event["body"] for event in self.events]

    def sent(self):
        """(name, path and query, props) of each event but engagement, in the order sent."""
        return [(body["n"], url_tail(body["u"]), body.get("p")) for body in self.bodies()
                if body["n"] != "engagement"]

    def wait_until(self, predicate, what):
        deadline = time.monotonic() + WAIT_TIMEOUT
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {WAIT_TIMEOUT:.0f}s waiting for {what}; "
                                     f"sent: {self.bodies()}; console: {self.console}")
            self.page.wait_for_timeout(20)      # lets Playwright deliver the page's events

    def wait_for_sent(self, count):
        self.wait_until(lambda: len(self.sent()) >= count, f"{count} events sent")
        self.wait_until(lambda: all(e["status"] or e["failure"] for e in self.events),
                        "an answer to every event")

    def assert_every_event_accepted(self):
        for event in self.events:
            assert event["failure"] is None, (event["body"], event["failure"])
            assert event["status"] == 202, event["body"]
            assert event["headers"].get("access-control-allow-origin") == "*"
            assert "x-analytics-dropped" not in event["headers"]

    def assert_no_errors(self):
        """A CORS refusal or a failed script shows here, even when the event itself arrived."""
        errors = [text for kind, text in self.console if kind == "error"]
        assert errors == [] and self.page_errors == []

    def warnings(self):
        return [text for kind, text in self.console if kind == "warning"]


def url_tail(url):
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


# -- fixtures -------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        # a fresh, empty profile directory comes with every launch
        # with the back/forward cache a visitor's Chromium has, which Playwright turns off
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                             ignore_default_args=["--disable-back-forward-cache"],
                                             headless=True, timeout=30_000)
        yield browser
        browser.close()


@pytest.fixture
def api(tmp_path):
    server = Api(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def site(api):
    server = Site(api.public_url)
    yield server
    server.close()


@pytest.fixture
def visit(browser, site):
    """visit(name) opens a page of tests/browser in a new browser profile; returns (page, traffic)."""
    contexts = []

    def open_page(name, host=SITE, user_agent=DESKTOP_CHROME, init_script=None):
        context = browser.new_context(user_agent=user_agent)
        contexts.append(context)
        context.set_default_timeout(WAIT_TIMEOUT * 1000)
        if init_script:
            context.add_init_script(init_script)
        page = context.new_page()
        traffic = Traffic(page)
        response = page.goto(site.url(name, host))
        assert response.status == 200
        return page, traffic

    yield open_page
    for context in contexts:
        context.close()


def browse(page, custom_event):
    """What every visitor does: two in-app navigations (the second only adds a query string),
    a custom event, then Back twice (first to the same path, then to the page loaded)."""
    page.evaluate("history.pushState({}, '', '/pricing')")
    page.evaluate(f"history.pushState({{}}, '', '/pricing{UTM}')")
    page.evaluate(custom_event)
    page.go_back()
    assert url_tail(page.url) == "/pricing"
    page.go_back()


# -- the tests ------------------------------------------------------------------

def test_current_npm_tracker_end_to_end(visit, api):
    page, traffic = visit("tracker-current.html")
    browse(page, "plausible('Signup', {props: {plan: 'pro'}})")
    traffic.wait_for_sent(4)

    # a pushState or Back that keeps the pathname sends nothing
    assert traffic.sent() == [("pageview", "/tracker-current.html", None),
                              ("pageview", "/pricing", None),
                              ("Signup", f"/pricing{UTM}", {"plan": "pro"}),
                              ("pageview", "/tracker-current.html", None)]
    assert all(body["v"] == 36 and body["d"] == SITE for body in traffic.bodies())
    # the page left behind by an in-app navigation gets an engagement event
    assert "engagement" in [body["n"] for body in traffic.bodies()]
    traffic.assert_no_errors()
    traffic.assert_every_event_accepted()

    api.drain()
    stats = api.stats()
    assert stats["total_views"] == 3 and stats["unique_users"] == 1
    assert stats["top_paths"] == [{"path": "/tracker-current.html", "views": 2},
                                  {"path": "/pricing", "views": 1}]
    # engagement is kept apart: neither a view nor an event
    assert {row["value"]: (row["views"], row["events"]) for row in api.breakdown("event_type")} == {
        "page_view": (3, 3), "Signup": (0, 1)}
    assert api.breakdown("props.plan") == [{"value": "pro", "views": 0, "events": 1, "unique_users": 1}]


def test_legacy_npm_tracker_end_to_end(visit, api):
    page, traffic = visit("tracker-legacy.html")
    browse(page, "trackEvent('Signup', {props: {plan: 'pro'}})")
    traffic.wait_for_sent(6)

    # the legacy tracker sends a pageview on every pushState and popstate, same path or not,
    # and its props as a JSON string
    assert traffic.sent() == [("pageview", "/tracker-legacy.html", None),
                              ("pageview", "/pricing", None),
                              ("pageview", f"/pricing{UTM}", None),
                              ("Signup", f"/pricing{UTM}", '{"plan":"pro"}'),
                              ("pageview", "/pricing", None),
                              ("pageview", "/tracker-legacy.html", None)]
    assert all(body["h"] == 0 and body["w"] > 0 and "v" not in body for body in traffic.bodies())
    traffic.assert_no_errors()
    traffic.assert_every_event_accepted()

    api.drain()
    stats = api.stats()
    assert stats["total_views"] == 5 and stats["unique_users"] == 1
    assert stats["top_paths"] == [{"path": "/pricing", "views": 3},
                                  {"path": "/tracker-legacy.html", "views": 2}]
    assert api.breakdown("props.plan") == [{"value": "pro", "views": 0, "events": 1, "unique_users": 1}]
    assert api.breakdown("utm_source") == [{"value": "newsletter", "views": 1, "events": 2, "unique_users": 1}]


def test_our_script_tag_end_to_end(visit, api):
    page, traffic = visit("script-tag.html")
    browse(page, "analytics('Signup', {props: {plan: 'pro'}, callback: answer => window.signupAnswer = answer})")
    traffic.wait_for_sent(4)
    traffic.wait_until(lambda: page.evaluate("window.signupAnswer"), "the custom event's callback")
    assert page.evaluate("window.signupAnswer") == {"status": 202}

    assert traffic.sent() == [("pageview", "/script-tag.html", None),
                              ("pageview", "/pricing", None),
                              ("Signup", f"/pricing{UTM}", {"plan": "pro"}),
                              ("pageview", "/script-tag.html", None)]
    assert all(body["d"] == SITE for body in traffic.bodies())
    traffic.assert_no_errors()
    traffic.assert_every_event_accepted()

    api.drain()
    stats = api.stats()
    assert stats["total_views"] == 3 and stats["unique_users"] == 1
    assert stats["top_paths"] == [{"path": "/script-tag.html", "views": 2}, {"path": "/pricing", "views": 1}]
    assert api.breakdown("props.plan") == [{"value": "pro", "views": 0, "events": 1, "unique_users": 1}]
    assert [row["value"] for row in api.breakdown("browser")] == ["Chrome"]


def test_our_script_counts_a_page_shown_again_from_the_back_forward_cache(visit, site, api):
    page, traffic = visit("script-tag.html")
    traffic.wait_for_sent(1)
    page.evaluate("addEventListener('pageshow', event => { window.restored = event.persisted })")
    page.goto(site.url("plain.html"))
    page.go_back(wait_until="commit")           # a page restored from the cache has no load event
    page.wait_for_function("window.restored !== undefined")
    assert page.evaluate("window.restored") is True, "the page was loaded again, not restored"
    traffic.wait_for_sent(2)
    assert traffic.sent() == [("pageview", "/script-tag.html", None)] * 2
    # Chromium aborts the reading of answers when it freezes a page for the cache: the
    # statuses came, and the store says the rest
    assert [event["status"] for event in traffic.events] == [202, 202]
    traffic.assert_no_errors()

    api.drain()
    assert api.stats()["top_paths"] == [{"path": "/script-tag.html", "views": 2}]


def test_our_script_counts_a_page_opened_in_the_background_once_it_is_shown(visit, api):
    hidden = ("Object.defineProperty(Document.prototype, 'visibilityState', "
              "{get: () => window.shown ? 'visible' : 'hidden', configurable: true});")
    page, traffic = visit("script-tag.html", init_script=hidden)
    page.wait_for_function("typeof window.analytics === 'function'")     # the script has run
    page.wait_for_timeout(200)
    assert traffic.events == []
    page.evaluate("window.shown = true; document.dispatchEvent(new Event('visibilitychange'))")
    page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")     # shown once only
    traffic.wait_for_sent(1)
    page.wait_for_timeout(200)
    assert traffic.sent() == [("pageview", "/script-tag.html", None)]
    traffic.assert_no_errors()
    traffic.assert_every_event_accepted()


def test_our_script_with_data_hash_counts_each_fragment_as_a_page(visit, api):
    page, traffic = visit("script-tag-hash.html")
    traffic.wait_for_sent(1)
    page.evaluate("location.hash = '#/pricing'")
    traffic.wait_for_sent(2)
    page.evaluate("history.pushState({}, '', '/script-tag-hash.html?ref=x#/pricing')")  # same page
    page.evaluate("location.hash = '#/docs'")
    traffic.wait_for_sent(3)
    page.wait_for_timeout(200)
    assert [body["u"].split("/", 3)[3] for body in traffic.bodies()] == [
        "script-tag-hash.html", "script-tag-hash.html#/pricing", "script-tag-hash.html?ref=x#/docs"]
    assert all(body["h"] == 1 for body in traffic.bodies())
    traffic.assert_no_errors()
    traffic.assert_every_event_accepted()

    api.drain()
    assert api.stats()["top_paths"] == [{"path": "/script-tag-hash.html", "views": 1},
                                        {"path": "/script-tag-hash.html#/docs", "views": 1},
                                        {"path": "/script-tag-hash.html#/pricing", "views": 1}]


def test_our_script_tag_without_data_domain_sends_the_page_s_host_name(visit, api):
    page, traffic = visit("script-tag-no-domain.html")
    traffic.wait_for_sent(1)
    assert [body["d"] for body in traffic.bodies()] == [SITE]
    traffic.assert_no_errors()
    traffic.assert_every_event_accepted()


def test_only_the_value_true_of_the_opt_out_flag_stops_our_script(visit, api):
    page, traffic = visit("script-tag.html", init_script="localStorage.analytics_ignore = 'false'")
    traffic.wait_for_sent(1)
    assert traffic.sent() == [("pageview", "/script-tag.html", None)]
    traffic.assert_no_errors()
    traffic.assert_every_event_accepted()


def test_a_custom_event_sent_before_our_script_loads_is_queued_and_sent(visit, api):
    page, traffic = visit("script-tag-inline-event.html")      # README's snippet
    traffic.wait_for_sent(2)
    assert traffic.sent() == [("Signup", "/script-tag-inline-event.html", {"plan": "pro"}),
                              ("pageview", "/script-tag-inline-event.html", None)]
    traffic.assert_no_errors()
    traffic.assert_every_event_accepted()


# Playwright's Chromium says navigator.webdriver: taken away, each other sign of automation alone
NOT_WEBDRIVER = "Object.defineProperty(Navigator.prototype, 'webdriver', {get: () => false});"


@pytest.mark.parametrize("page_name,host,init_script,reason", [
    ("script-tag.html", SITE, "localStorage.analytics_ignore = 'true'", "opted out"),
    ("script-tag-defaults.html", SITE, None, "automation"),
    *[("script-tag-defaults.html", SITE, f"{NOT_WEBDRIVER} window.{name} = {{}};", "automation")
      for name in ("_phantom", "__nightmare", "Cypress")],
    ("script-tag.html", "localhost", None, "localhost"),
    ("script-tag.html", "127.0.0.1", None, "localhost"),
], ids=["opted-out", "automation", "phantom", "nightmare", "cypress", "localhost", "127.0.0.1"])
def test_our_script_sends_nothing_when_it_must_not(visit, api, page_name, host, init_script, reason):
    page, traffic = visit(page_name, host=host, init_script=init_script)
    page.evaluate("history.pushState({}, '', '/pricing')")
    page.evaluate("analytics('Signup', {props: {plan: 'pro'}})")

    # the script warns where it would have sent: once a warning is there, that event was not sent
    expected = [f"analytics: ignoring {name}: {reason}" for name in ("pageview", "pageview", "Signup")]
    traffic.wait_until(lambda: len(traffic.warnings()) >= len(expected), f"{len(expected)} warnings")
    assert traffic.warnings() == expected
    assert traffic.events == []
    traffic.assert_no_errors()
    assert api.get("/health")["queue_size"] == 0


def test_our_script_on_a_page_saved_to_a_file_sends_nothing(browser, api, tmp_path):
    saved = tmp_path / "saved.html"
    saved.write_text((PAGES / "script-tag.html").read_text().replace("{{api}}", api.public_url))
    context = browser.new_context(user_agent=DESKTOP_CHROME)
    try:
        page = context.new_page()
        traffic = Traffic(page)
        page.goto(saved.as_uri())
        traffic.wait_until(lambda: traffic.warnings(), "a warning")
        assert traffic.warnings() == ["analytics: ignoring pageview: localhost"]
        assert traffic.events == []
        traffic.assert_no_errors()
    finally:
        context.close()


def test_headless_chromium_is_dropped_as_a_bot(visit, api):
    page, traffic = visit("script-tag.html", user_agent=None)
    assert "HeadlessChrome" in page.evaluate("navigator.userAgent")
    traffic.wait_for_sent(1)

    [event] = traffic.events
    assert event["status"] == 202 and event["headers"]["x-analytics-dropped"] == "bot"
    traffic.assert_no_errors()
    assert api.get("/health")["queue_size"] == 0
    api.drain()
    stats = api.stats()
    assert stats["total_views"] == 0 and stats["unique_users"] == 0


# (what the page sends, fetch's options): our JSON API, called by a page's own code
EVENT = json.dumps({"site_id": SITE, "event_type": "page_view", "path": "/fetch"})
FETCHES = [
    ("/event", {"method": "POST", "headers": {"Content-Type": "application/json"}, "body": EVENT}),
    ("/event", {"method": "POST", "body": EVENT}),            # text/plain: no preflight
    ("/events", {"method": "POST", "headers": {"Content-Type": "application/json"}, "body": f"[{EVENT}]"}),
    ("/events", {"method": "POST", "headers": {"Content-Type": "application/x-ndjson"}, "body": EVENT}),
    ("/event", {"method": "POST", "headers": {"Content-Type": "application/json"}, "body": "{}"}),
]


def test_a_page_of_another_site_reads_every_answer_of_the_json_api(visit, api):
    """A fetch the page cannot read fails in the page even when the event was taken, so a
    script that retries on failure would store it twice."""
    page, traffic = visit("plain.html")
    answers = page.evaluate("""async ([api, fetches]) => Promise.all(fetches.map(([path, init]) =>
        fetch(api + path, init).then(async r => [r.status, await r.json()], e => String(e))))""",
                            [api.public_url, FETCHES])
    event, batch = [200, {"message": "Event received"}], [200, {"message": "Events received", "count": 1}]
    assert answers == [event, event, batch, batch, [400, {"error": "Missing required field: site_id"}]]
    api.drain()
    assert api.stats()["total_views"] == 4
