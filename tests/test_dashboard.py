"""The dashboard at GET /, in headless Chromium, against the real API and processor.

Generated traffic for a few sites over several weeks goes through the queue
and the processor; the page must then show exactly what the JSON reports
answer for the site and period it shows, switch sites and periods, ask for an
API key when the server wants one, and log no console errors. Screenshots go
to test-artifacts/.

Needs Debian's chromium and playwright: run .ci/provision-browser.
"""
import random
import re
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from werkzeug.serving import make_server

from config import load_config
from events import encode_event, validate_event
from ingestion_api import create_app
from processor import Processor
from shared_queue import open_queue
from store import open_store

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_PAGE_BYTES = 50_000
KEY = "dashboard-test-key"
SITES = {"shop.example": 700, "blog.example": 300, "docs.example": 120}    # events per site
PATHS = ["/", "/pricing", "/docs/start", "/blog/launch", "/about", "/checkout"]
USER_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.5 Mobile/15E148 Safari/604.1",
]
REFERRERS = [None, None, "https://news.ycombinator.com/item?id=1", "https://www.google.com/",
             "https://duckduckgo.com/"]
# the tables under the chart: element id, property, the label of a null value, and the count shown
BREAKDOWNS = [("source", "Direct / none", "views"), ("browser", "(unknown)", "views"),
              ("os", "(unknown)", "views"), ("device", "(unknown)", "views"),
              ("event_type", "(none)", "events")]

pytestmark = pytest.mark.timeout(120)
# The moment every test here takes as now: its traffic is dated from it and every page's clock is fixed
# to it. A page reads the day when it shows a period, a test when it checks it: 00:00 UTC may pass between.
NOW = datetime.now(timezone.utc)


def today():
    return NOW.date()


def generated_lines(site, count, rng):
    """Browser-like queue lines of one site over the last 25 days, more of them lately."""
    for _ in range(count):
        day = today() - timedelta(days=min(rng.randrange(25), rng.randrange(25)))
        event = validate_event({
            "site_id": site, "event_type": rng.choice(["page_view"] * 8 + ["Signup", "Download"]),
            "path": rng.choice(PATHS),
            "timestamp": f"{day.isoformat()}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:00Z"}, NOW)
        event.update(visitor_id=f"visitor-{rng.randrange(count // 3)}", ua=rng.choice(USER_AGENTS),
                     referrer=rng.choice(REFERRERS),
                     query=rng.choice([None, None, None, "utm_source=newsletter"]),
                     props={"plan": "pro"} if event["event_type"] == "Signup" else None)
        yield encode_event(event)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data directory with every site's traffic stored by the real processor."""
    directory = tmp_path_factory.mktemp("dashboard")
    config = load_config(environ={}, data_dir=str(directory))
    rng = random.Random(6)
    store_lines(config, [line for site, count in SITES.items() for line in generated_lines(site, count, rng)])
    return directory


def store_lines(config, lines):
    """Queue lines stored by the real processor, as the API and the processor would."""
    open_queue(config).append(lines)
    processor = Processor(open_queue(config), open_store(config), config)
    processor.start()
    processor.run(once=True)
    processor.close()


class Server:
    """The app served by werkzeug in a thread; get() reads a JSON report as any client would."""

    def __init__(self, data_dir, **settings):
        self.key = settings["api_keys"][0] if settings.get("api_keys") else None
        self.app = create_app(load_config(environ={}, data_dir=str(data_dir), **settings))
        self.http = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.http.server_port}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def get(self, path, **params):
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        response = requests.get(self.url + path, params=params, headers=headers, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def stop(self):
        self.http.shutdown()
        self.thread.join()
        self.app.extensions["analytics"]["queue"].close()
        self.app.extensions["analytics"]["store"].close()


@pytest.fixture(scope="module")
def server(data_dir):
    server = Server(data_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keyed_server(data_dir):
    server = Server(data_dir, api_keys=(KEY,))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"dashboard browser tests need Debian's chromium ({CHROMIUM}): run .ci/provision-browser")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="dashboard browser tests need playwright: pip install -r requirements-dev.txt")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                             headless=True, timeout=30_000)
        yield browser
        browser.close()


class Dashboard:
    """One page of the dashboard, with what its console said and the requests it made."""

    def __init__(self, page, server):
        self.page = page
        self.server = server
        self.console_errors = []
        self.requests = []
        page.on("console", lambda message: message.type == "error" and self.console_errors.append(message.text))
        page.on("pageerror", lambda error: self.console_errors.append(str(error)))
        page.on("request", lambda request: self.requests.append(request))

    def open(self, fragment=""):
        response = self.page.goto(f"{self.server.url}/{fragment}")
        assert response.status == 200

    def wait_until_shown(self):
        self.page.wait_for_selector("body[data-state=shown]")

    def choose(self, selector, value):
        self.page.select_option(selector, value)
        self.wait_until_shown()

    def text(self, selector):
        return self.page.text_content(selector)

    def table(self, element_id):
        return self.page.eval_on_selector_all(
            f"#{element_id} tr:has(td:not(.empty))", "rows => rows.map(row => [...row.cells].map(c => c.textContent))")

    def assert_shows_the_reports(self, site, start, end):
        """Every number on the page is what the JSON reports answer for this site and period."""
        period = {"site_id": site, "from": start.isoformat(), "to": end.isoformat()}
        stats = self.server.get("/stats", **period, limit=10)
        assert number(self.text("#views")) == stats["total_views"]
        assert number(self.text("#users")) == stats["unique_users"]
        assert [(path, number(views)) for path, views in self.table("paths")] == [
            (row["path"], row["views"]) for row in stats["top_paths"]]
        for prop, empty, count in BREAKDOWNS:
            results = self.server.get("/stats/breakdown", **period, property=prop, limit=11)["results"]
            expected = [(row["value"] or empty, row[count], row["unique_users"])
                        for row in results if row["value"] != "page_view"][:10]
            assert [(value, number(n), number(users)) for value, n, users in self.table(prop)] == expected, prop
        interval = "hour" if start == end else "day"
        points = self.server.get("/stats/timeseries", **period, interval=interval)["points"]
        bars = self.page.eval_on_selector_all("#chart rect.bar title", "titles => titles.map(t => t.textContent)")
        assert bars == [f"{p['date']}: {p['views']:,} views, {p['unique_users']:,} unique users" for p in points]
        return stats

    def assert_no_console_errors(self):
        assert self.console_errors == []


def number(text):
    assert re.fullmatch(r"\d{1,3}(,\d{3})*", text), text
    return int(text.replace(",", ""))


@pytest.fixture
def open_dashboard(browser):
    """open_dashboard(server, viewport=None, timezone_id=None, color_scheme="light") -> a Dashboard
    in a fresh browser profile."""
    contexts = []

    def open_page(server, viewport=None, timezone_id=None, color_scheme="light"):
        context = browser.new_context(viewport=viewport or {"width": 1280, "height": 900},
                                      timezone_id=timezone_id, color_scheme=color_scheme)
        context.set_default_timeout(15_000)
        context.clock.set_fixed_time(NOW)
        contexts.append(context)
        return Dashboard(context.new_page(), server)

    yield open_page
    for context in contexts:
        context.close()


# -- the page itself ------------------------------------------------------------

def test_page_and_its_assets_are_our_own_and_under_50_kb(server):
    page = requests.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    # everything the page loads comes from here (the icon is an empty data: URL)
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(assets) == ["data:,", "static/dashboard.css", "static/dashboard.js"]
    total = len(page.content)
    for asset in assets:
        if asset.startswith("data:"):
            continue
        response = requests.get(f"{server.url}/{asset}", timeout=10)
        assert response.status_code == 200, asset
        total += len(response.content)
    assert total < MAX_PAGE_BYTES, f"the dashboard is {total} bytes, more than {MAX_PAGE_BYTES}"


# -- in the browser -----------------------------------------------------------------

def test_the_page_says_what_a_browser_may_do_with_it_and_works_within_that(open_dashboard, server):
    """The page keeps an API key in storage: no other site may frame it, restyle it, give it a base
    URL, a form target or a script, nor be told its address."""
    dashboard = open_dashboard(server)
    dashboard.page.add_init_script("window.violations = []; document.addEventListener("
                                   "'securitypolicyviolation', (event) => violations.push(event.violatedDirective))")
    response = dashboard.page.goto(server.url + "/")
    policy = dict(directive.strip().split(" ", 1) for directive in
                  response.headers["content-security-policy"].split(";"))
    assert policy == {"default-src": "'self'", "img-src": "'self' data:", "frame-ancestors": "'none'",
                      "base-uri": "'none'", "form-action": "'none'"}
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    dashboard.wait_until_shown()
    dashboard.choose("#period", "30d")
    dashboard.assert_shows_the_reports(sorted(SITES)[0], today() - timedelta(days=29), today())
    assert dashboard.page.evaluate("violations") == []
    dashboard.assert_no_console_errors()

    # a page of another site that frames the dashboard gets nothing of it
    framing = open_dashboard(server)
    framing.page.set_content(f'<iframe src="{server.url}/"></iframe>')
    framing.page.wait_for_load_state("load")
    assert [frame.url for frame in framing.page.frames][1:] != [server.url + "/"]
    assert framing.page.frames[1].query_selector("#site") is None



def test_dashboard_shows_exactly_what_the_reports_say(open_dashboard, server):
    dashboard = open_dashboard(server)
    dashboard.open()
    dashboard.wait_until_shown()

    # the sites with data are offered, and the first one is shown for the last 7 days
    sites = [site["site_id"] for site in server.get("/stats/sites")["sites"]]
    assert sites == sorted(SITES)
    assert dashboard.page.eval_on_selector_all("#site option", "options => options.map(o => o.value)") == sites
    assert dashboard.page.input_value("#period") == "7d"
    week = dashboard.assert_shows_the_reports(sites[0], today() - timedelta(days=6), today())
    ARTIFACTS.mkdir(exist_ok=True)
    dashboard.page.screenshot(path=ARTIFACTS / "dashboard.png", full_page=True)

    # each period shows its own numbers: the generated traffic differs from one period to the next
    dashboard.choose("#period", "today")
    day = dashboard.assert_shows_the_reports(sites[0], today(), today())
    assert len(dashboard.page.query_selector_all("#chart rect.bar")) == 24
    dashboard.choose("#period", "30d")
    month = dashboard.assert_shows_the_reports(sites[0], today() - timedelta(days=29), today())
    assert day["total_views"] < week["total_views"] < month["total_views"]
    assert number(dashboard.text("#views")) == month["total_views"]

    dashboard.page.select_option("#period", "custom")
    start, end = today() - timedelta(days=12), today() - timedelta(days=3)
    dashboard.page.fill("#from", start.isoformat())
    dashboard.page.fill("#to", end.isoformat())
    dashboard.wait_until_shown()
    dashboard.assert_shows_the_reports(sites[0], start, end)
    assert len(dashboard.page.query_selector_all("#chart rect.bar")) == 10
    dashboard.assert_no_console_errors()


def test_periods_are_utc_days_in_a_browser_whose_date_is_another(open_dashboard, server):
    # UTC+14 is a day ahead from 10:00 UTC on, UTC-12 a day behind until 12:00 UTC
    zone = "Pacific/Kiritimati" if NOW.hour >= 10 else "Etc/GMT+12"
    dashboard = open_dashboard(server, timezone_id=zone)
    dashboard.open()
    dashboard.wait_until_shown()
    assert dashboard.page.evaluate("new Date().getDate()") != today().day      # the local date
    site = sorted(SITES)[0]
    dashboard.assert_shows_the_reports(site, today() - timedelta(days=6), today())
    dashboard.choose("#period", "today")
    dashboard.assert_shows_the_reports(site, today(), today())
    assert dashboard.page.eval_on_selector_all("#chart rect.bar title", "titles => titles.map(t => t.textContent)")[
        0].startswith(f"{today().isoformat()}T00:00:00Z: ")
    dashboard.page.select_option("#period", "custom")
    dashboard.wait_until_shown()
    assert (dashboard.page.input_value("#from"), dashboard.page.input_value("#to")) == (
        (today() - timedelta(days=6)).isoformat(), today().isoformat())
    dashboard.assert_shows_the_reports(site, today() - timedelta(days=6), today())
    dashboard.assert_no_console_errors()


def test_a_range_that_ends_before_it_starts_shows_no_numbers(open_dashboard, server):
    dashboard = open_dashboard(server)
    dashboard.open()
    dashboard.wait_until_shown()
    dashboard.page.select_option("#period", "custom")
    dashboard.page.fill("#from", today().isoformat())
    dashboard.page.fill("#to", (today() - timedelta(days=3)).isoformat())
    dashboard.page.wait_for_selector("body[data-state=invalid]")
    assert "start is not after its end" in dashboard.text("#status")
    assert dashboard.page.is_hidden("#report")
    dashboard.assert_no_console_errors()


def test_an_empty_server_says_how_to_send_data(open_dashboard, tmp_path):
    server = Server(tmp_path)
    try:
        dashboard = open_dashboard(server)
        dashboard.open()
        dashboard.page.wait_for_selector("body[data-state=empty]")
        assert "No data yet" in dashboard.text("#status")
        assert dashboard.page.is_hidden("#report")
        dashboard.assert_no_console_errors()
    finally:
        server.stop()


def failed_report(dashboard):
    """Choose the last 30 days, which fails; the numbers go. Returns the status message."""
    dashboard.page.select_option("#period", "30d")
    dashboard.page.wait_for_selector("body[data-state=failed]")
    assert dashboard.page.is_hidden("#report")
    return dashboard.text("#status")


def test_a_refused_report_shows_the_servers_reason_and_no_numbers(open_dashboard, data_dir):
    server = Server(data_dir, report_max_days=7)
    try:
        dashboard = open_dashboard(server)
        dashboard.open()
        dashboard.wait_until_shown()
        assert failed_report(dashboard) == ("Could not load the reports: "
                                            "Invalid to: the range from..to is 30 days, at most 7")
        assert all("status of 400" in text for text in dashboard.console_errors), dashboard.console_errors
    finally:
        server.stop()


def test_a_server_that_stopped_answering_is_said_so_and_its_old_numbers_go(open_dashboard, data_dir):
    server = Server(data_dir)
    dashboard = open_dashboard(server)
    dashboard.open()
    dashboard.wait_until_shown()
    server.stop()
    assert failed_report(dashboard) == ("Could not load the reports: the server did not answer. "
                                        "Is it running, and is this computer online?")


def test_while_a_slow_report_loads_the_previous_numbers_are_dimmed(open_dashboard, server):
    dashboard = open_dashboard(server)
    dashboard.open()
    dashboard.wait_until_shown()
    week = dashboard.text("#views")
    held = []
    dashboard.page.route("**/stats?*", lambda route: held.append(route))
    dashboard.page.select_option("#period", "30d")
    dashboard.page.wait_for_selector("body[data-state=loading]")
    dashboard.page.wait_for_function("() => getComputedStyle(document.getElementById('report')).opacity < 0.5")
    assert dashboard.page.get_attribute("#report", "aria-busy") == "true"
    assert dashboard.text("#views") == week         # the last period's number, no longer passed off as current
    for route in held:
        route.continue_()
    dashboard.wait_until_shown()
    assert dashboard.page.get_attribute("#report", "aria-busy") is None
    assert dashboard.page.evaluate("getComputedStyle(document.getElementById('report')).opacity") == "1"
    dashboard.assert_shows_the_reports(sorted(SITES)[0], today() - timedelta(days=29), today())
    dashboard.assert_no_console_errors()


def test_site_picker_switches_sites_and_the_url_remembers_the_choice(open_dashboard, server):
    dashboard = open_dashboard(server)
    dashboard.open()
    dashboard.wait_until_shown()
    first = number(dashboard.text("#views"))

    dashboard.choose("#site", "shop.example")
    shop = dashboard.assert_shows_the_reports("shop.example", today() - timedelta(days=6), today())
    assert shop["total_views"] != first
    dashboard.choose("#period", "30d")
    assert urlsplit(dashboard.page.url).fragment == "site=shop.example&period=30d"

    # a reload, or the same URL in another browser, shows the same site and period
    other = open_dashboard(server)
    other.open("#site=shop.example&period=30d")
    other.wait_until_shown()
    other.assert_shows_the_reports("shop.example", today() - timedelta(days=29), today())
    dashboard.assert_no_console_errors()
    other.assert_no_console_errors()


def test_the_page_follows_the_url_on_back_forward_and_an_edited_fragment(open_dashboard, server):
    dashboard = open_dashboard(server)
    dashboard.open("#site=docs.example&period=7d")
    dashboard.wait_until_shown()
    dashboard.choose("#site", "shop.example")
    dashboard.choose("#period", "30d")

    # each choice is a step back and forward go through, showing what the URL names
    dashboard.page.go_back()
    dashboard.page.wait_for_function("document.getElementById('period').value === '7d'")
    dashboard.wait_until_shown()
    assert urlsplit(dashboard.page.url).fragment == "site=shop.example&period=7d"
    dashboard.assert_shows_the_reports("shop.example", today() - timedelta(days=6), today())
    dashboard.page.go_back()
    dashboard.page.wait_for_function("document.getElementById('site').value === 'docs.example'")
    dashboard.wait_until_shown()
    dashboard.assert_shows_the_reports("docs.example", today() - timedelta(days=6), today())
    dashboard.page.go_forward()
    dashboard.page.wait_for_function("document.getElementById('site').value === 'shop.example'")
    dashboard.wait_until_shown()
    dashboard.assert_shows_the_reports("shop.example", today() - timedelta(days=6), today())

    # a bookmark opened, or the address edited, on the open page
    start, end = today() - timedelta(days=4), today() - timedelta(days=1)
    dashboard.page.evaluate("hash => { location.hash = hash; }",
                            f"#site=blog.example&period=custom&from={start}&to={end}")
    dashboard.page.wait_for_function("document.getElementById('site').value === 'blog.example'")
    dashboard.wait_until_shown()
    assert dashboard.page.is_visible("#range")
    dashboard.assert_shows_the_reports("blog.example", start, end)

    # a site the server does not know: the site shown stays, and so does the URL that names it
    dashboard.page.evaluate("location.hash = '#site=nowhere.example&period=today'")
    dashboard.page.wait_for_function("location.hash === '#site=blog.example&period=today'")
    dashboard.wait_until_shown()
    dashboard.assert_shows_the_reports("blog.example", today(), today())
    dashboard.assert_no_console_errors()


def custom_event_lines(site, events):
    """Queue lines of events sent today, as the tracker sends them: (name, visitor, props) each."""
    for name, visitor, props in events:
        event = validate_event({"site_id": site, "event_type": name, "path": "/"}, NOW)
        event.update(visitor_id=visitor, ua=USER_AGENTS[0], props=props)
        yield encode_event(event)


def test_custom_events_are_counted_and_a_property_named_shows_its_values(open_dashboard, tmp_path):
    config = load_config(environ={}, data_dir=str(tmp_path))
    store_lines(config, list(custom_event_lines("props.example", [
        ("page_view", "v1", None),
        ("Signup", "v1", {"plan": "pro"}), ("Signup", "v2", {"plan": "pro"}), ("Signup", "v2", {"plan": "pro"}),
        ("Signup", "v3", {"plan": "free", "seats": "5"}), ("Signup", "v4", None),
        ("Download", "v1", {"file": "/a.pdf"}), ("Download", "v1", {"file": "/a.pdf", "plan": ""})])))
    server = Server(tmp_path)
    try:
        dashboard = open_dashboard(server)
        dashboard.open("#site=props.example&period=today")
        dashboard.wait_until_shown()
        assert dashboard.table("event_type") == [["Signup", "5", "4"], ["Download", "2", "1"]]
        # the names sent are offered (byte order), in the panel and as the input's suggestions
        assert dashboard.text("#props td.empty") == "Name a property to see its values: file, plan, seats"
        assert dashboard.page.eval_on_selector_all("#prop-names option", "options => options.map(o => o.value)") == [
            "file", "plan", "seats"]

        def name_property(name):
            dashboard.page.fill("#prop", name)
            dashboard.page.press("#prop", "Enter")
            dashboard.page.wait_for_function("name => new URLSearchParams(location.hash.slice(1)).get('prop') "
                                             "=== name", arg=name)
            dashboard.wait_until_shown()

        # the prop of every event that has it, by events and unique users; sent empty, it is a value
        name_property("plan")
        assert dashboard.page.eval_on_selector_all("#props th", "cells => cells.map(c => c.textContent)") == [
            "plan", "Events", "Users"]
        assert dashboard.table("props") == [["pro", "3", "2"], ["(empty)", "1", "1"], ["free", "1", "1"]]
        name_property("file")
        assert dashboard.table("props") == [["/a.pdf", "2", "1"]]
        assert urlsplit(dashboard.page.url).fragment == "site=props.example&period=today&prop=file"

        # the property named is a step in the history, and a bookmark shows it
        dashboard.page.go_back()
        dashboard.page.wait_for_function("document.getElementById('prop').value === 'plan'")
        dashboard.wait_until_shown()
        assert dashboard.table("props") == [["pro", "3", "2"], ["(empty)", "1", "1"], ["free", "1", "1"]]
        dashboard.page.go_back()
        dashboard.page.wait_for_function("document.getElementById('prop').value === ''")
        dashboard.wait_until_shown()
        assert dashboard.table("props") == []
        other = open_dashboard(server)
        other.open("#site=props.example&period=today&prop=seats")
        other.wait_until_shown()
        assert other.page.input_value("#prop") == "seats"
        assert other.table("props") == [["5", "1", "1"]]
        past = open_dashboard(server)
        past.open("#site=props.example&period=custom&from=2020-01-01&to=2020-01-01")
        past.wait_until_shown()
        assert past.text("#props td.empty") == "No event in this period was sent with properties (props)"

        # a name the API would refuse is not asked for: the rest of the report stays
        asked = len(dashboard.requests)
        dashboard.page.fill("#prop", "plan/../x")
        dashboard.page.press("#prop", "Enter")
        dashboard.page.wait_for_function("location.hash.includes('prop=plan%2F')")
        dashboard.wait_until_shown()
        assert dashboard.text("#props td.empty").startswith("A property name is 1 to 64 letters")
        assert not [request for request in dashboard.requests[asked:] if "property=props." in request.url]
        assert dashboard.table("event_type") == [["Signup", "5", "4"], ["Download", "2", "1"]]
        dashboard.assert_no_console_errors()
        other.assert_no_console_errors()
    finally:
        server.stop()


def test_reads_as_a_column_on_a_phone(open_dashboard, server):
    dashboard = open_dashboard(server, viewport={"width": 375, "height": 740})
    dashboard.open()
    dashboard.wait_until_shown()
    # nothing wider than the screen: no sideways scrolling
    assert dashboard.page.evaluate("document.documentElement.scrollWidth") <= 375
    ARTIFACTS.mkdir(exist_ok=True)
    dashboard.page.screenshot(path=ARTIFACTS / "dashboard-phone.png", full_page=True)
    dashboard.assert_no_console_errors()


def test_the_chart_is_drawn_as_wide_as_its_card_when_the_report_first_appears(open_dashboard, server):
    dashboard = open_dashboard(server)
    dashboard.open()
    dashboard.wait_until_shown()
    width = dashboard.page.evaluate("document.getElementById('chart').clientWidth")
    assert width > 600
    assert dashboard.page.get_attribute("#chart svg", "viewBox") == f"0 0 {width} 220"
    coordinates = dashboard.page.eval_on_selector_all(
        "#chart rect, #chart circle, #chart line, #chart text",
        "shapes => shapes.flatMap(s => ['x', 'y', 'x1', 'y1', 'cx', 'cy', 'width', 'height']"
        ".map(name => s.getAttribute(name)).filter(value => value !== null))")
    assert coordinates and all(re.fullmatch(r"-?\d+(\.\d)?", value) for value in coordinates)
    dashboard.assert_no_console_errors()


def test_asks_for_the_api_key_once_and_sends_it_only_as_a_bearer_token(open_dashboard, keyed_server):
    dashboard = open_dashboard(keyed_server)
    dashboard.open()
    dashboard.page.wait_for_selector("#key-form:not([hidden])")
    assert dashboard.page.is_hidden("#report")

    # every field has a label, read out by screen readers and clicked to focus it
    labels = dashboard.page.eval_on_selector_all(
        "input, select", "fields => fields.map(f => [f.id, f.labels.length ? f.labels[0].textContent.trim() : null])")
    assert all(label for _, label in labels), labels
    assert ["key", "API key"] in labels
    dashboard.page.click("label[for=key]")
    assert dashboard.page.evaluate("document.activeElement.id") == "key"

    dashboard.page.fill("#key", "not-the-key")
    dashboard.page.click("#key-form button")
    dashboard.page.wait_for_selector("#key-reason:has-text('refused')")
    dashboard.page.fill("#key", "\u043a\u043b\u044e\u0447")     # no header can carry it: refused, asked again
    dashboard.page.click("#key-form button")
    dashboard.page.wait_for_selector("#key-form:not([hidden]) #key-reason:has-text('refused')")
    assert dashboard.page.is_hidden("#forget")              # a refused key is not kept
    assert dashboard.page.evaluate("document.activeElement.id") == "key"     # ready for another try
    dashboard.page.fill("#key", KEY)
    dashboard.page.press("#key", "Enter")
    dashboard.wait_until_shown()
    dashboard.assert_shows_the_reports("blog.example", today() - timedelta(days=6), today())
    # the form is gone: the keyboard carries on from the first control, not from the top of the page
    assert dashboard.page.evaluate("document.activeElement.id") == "site"

    # once given, the key is not asked again: not after a reload, not for another period
    dashboard.open()
    dashboard.wait_until_shown()
    dashboard.choose("#period", "today")
    assert dashboard.page.is_hidden("#key-form")

    reports = [request for request in dashboard.requests if urlsplit(request.url).path.startswith("/stats")]
    sent = [request for request in reports if request.headers.get("authorization") == f"Bearer {KEY}"]
    assert len(sent) >= 2 * 7
    assert all(KEY not in request.url for request in dashboard.requests)
    # the only errors are the browser's own notes of the two 401 answers (no key, the wrong key)
    assert len(dashboard.console_errors) == 2, dashboard.console_errors
    assert all("status of 401" in text for text in dashboard.console_errors), dashboard.console_errors


def test_site_ids_are_picked_exactly_and_the_longest_fits_a_phone(open_dashboard, tmp_path):
    """An <option> without a value stands for its text with spaces collapsed: another site."""
    config = load_config(environ={}, data_dir=str(tmp_path))
    now = today().isoformat() + "T12:00:00Z"
    sites = {"two  spaces": 2, "two spaces": 1, "x" * 256: 1}
    store_lines(config, [encode_event(validate_event({
        "site_id": site, "event_type": "page_view", "path": "/p", "timestamp": now}))
        for site, count in sites.items() for _ in range(count)])
    server = Server(tmp_path)
    try:
        dashboard = open_dashboard(server, viewport={"width": 375, "height": 740})
        dashboard.open()
        dashboard.wait_until_shown()
        for site, views in sites.items():
            # picked by exact value (Playwright's select_option collapses spaces when it matches)
            dashboard.page.eval_on_selector("#site", "(picker, site) => { picker.value = site; "
                                            "picker.dispatchEvent(new Event('change')); }", site)
            dashboard.wait_until_shown()
            assert dashboard.page.eval_on_selector("#site", "picker => picker.value") == site
            assert number(dashboard.text("#views")) == views
        assert dashboard.page.evaluate("document.documentElement.scrollWidth") <= 375
        dashboard.assert_no_console_errors()
    finally:
        server.stop()


# -- what anyone may send -------------------------------------------------------------

# values that would run, restyle or reshape the page if they were read as markup
MARKUP = ["<script>document.title = 'pwned'</script>", "<img src=x onerror=\"document.title = 'pwned'\">",
          "<svg onload=\"document.title = 'pwned'\">", "javascript:document.title = 'pwned'",
          "</td></tr></table><h1>Pwned</h1>", "<style>* { display: none }</style>"]
# characters that draw nothing or reorder the text after them, and how the page shows them
HIDDEN = {"/\u202egnp.exe": "/\u27e8U+202E\u27e9gnp.exe",           # drawn as /exe.png
          "/log\u200bin": "/log\u27e8U+200B\u27e9in",                 # drawn as /login
          "/a\n/b": "/a\u27e8U+000A\u27e9/b",
          "/log\u2028in": "/log\u27e8U+2028\u27e9in"}                # a line separator draws nothing in a line
HIDDEN_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b\u200e\u200f"
                              "\u2028\u2029\u202a-\u202e\u2060-\u206f\u3164\uffa0\ufeff\ufff9-\ufffc"
                              "\U0001d173-\U0001d17a\U000e0001]")
# more that Chromium draws as nothing (or, Hangul fillers, as a blank), and what emoji and scripts need
INVISIBLE = "\u034f\u115f\u1160\u17b4\u2029\u206a\u3164\uffa0\ufff9\ufffc\U0001d173\U000e0001"
NEEDED = ["\u0646\u0645\u200c\u06cc", "\U0001f469\u200d\U0001f4bb", "\u2764\ufe0f",
          "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"]


def hostile_lines(site, referrer):
    for value in MARKUP + list(HIDDEN):
        for event_type, path in (("page_view", value), (value, "/")):
            event = validate_event({"site_id": site, "event_type": event_type, "path": path}, NOW)
            event.update(ua=USER_AGENTS[0], referrer=referrer, props={"sent": value})
            yield encode_event(event)


def test_values_anyone_may_send_are_shown_as_the_text_they_are(open_dashboard, tmp_path):
    """Ingestion is open: a site id, path, source or event name is whatever a client made it."""
    config = load_config(environ={}, data_dir=str(tmp_path))
    store_lines(config, [*hostile_lines("hostile.example", "https://evil\u202emoc.elgoog/"),
                         *hostile_lines("\u202emoc.knab", None)])
    server = Server(tmp_path)
    try:
        dashboard = open_dashboard(server)
        dialogs = []
        dashboard.page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        dashboard.open("#site=hostile.example&period=today&prop=sent")
        dashboard.wait_until_shown()

        shown = {**{value: value for value in MARKUP}, **HIDDEN}
        assert sorted(path for path, _ in dashboard.table("paths")) == sorted(shown.values())
        assert sorted(name for name, _, _ in dashboard.table("event_type")) == sorted(shown.values())
        assert sorted(value for value, _, _ in dashboard.table("props")) == sorted(shown.values())
        assert [source for source, _, _ in dashboard.table("source")] == ["evil\u27e8U+202E\u27e9moc.elgoog"]
        assert dashboard.page.eval_on_selector_all("#site option", "options => options.map(o => o.text)") == [
            "hostile.example", "\u27e8U+202E\u27e9moc.knab"]
        texts = dashboard.page.eval_on_selector_all("td, option", "cells => cells.map(c => c.textContent)")
        assert not [text for text in texts if HIDDEN_CHARACTER.search(text)]
        assert dashboard.page.evaluate("values => values.map(visible)", list(INVISIBLE) + NEEDED) == [
            f"\u27e8U+{ord(character):04X}\u27e9" for character in INVISIBLE] + NEEDED
        # nothing of it became an element, ran or restyled the page
        assert dashboard.page.evaluate("document.querySelectorAll('img, svg:not(#chart svg), style, h1 + h1, "
                                       "main h1, a, iframe, object').length") == 0
        assert dashboard.page.title() == "Analytics" and dialogs == []
        assert dashboard.page.is_visible("#paths")
        dashboard.assert_no_console_errors()
    finally:
        server.stop()


def test_a_value_as_long_as_events_may_hold_takes_three_lines_and_its_tooltip_holds_it_whole(
        open_dashboard, tmp_path):
    """A path may be 2,048 characters and an event name 256: one event must not push the page
    down by a screenful (the 2,048 were a 2,400 pixel high row)."""
    config = load_config(environ={}, data_dir=str(tmp_path))
    path, name = "/" + "W" * 2047, "E" * 256
    store_lines(config, [encode_event(validate_event(event, NOW)) for event in (
        {"site_id": "long.example", "event_type": "page_view", "path": path},
        {"site_id": "long.example", "event_type": name, "path": "/"})])
    server = Server(tmp_path)
    try:
        for width in (1280, 375):
            dashboard = open_dashboard(server, viewport={"width": width, "height": 800})
            dashboard.open("#site=long.example&period=today")
            dashboard.wait_until_shown()
            assert dashboard.table("paths") == [[path, "1"]]
            assert dashboard.table("event_type") == [[name, "1", "0"]]
            heights = dashboard.page.eval_on_selector_all(
                "td:first-child", "cells => cells.map(c => c.getBoundingClientRect().height)")
            line = dashboard.page.evaluate("parseFloat(getComputedStyle(document.body).lineHeight)")
            assert max(heights) < 4 * line, (width, heights, line)
            assert dashboard.page.get_attribute(f"#paths td[title^='/W']", "title") == path
            assert dashboard.page.evaluate("document.documentElement.scrollWidth") <= width
            dashboard.assert_no_console_errors()
    finally:
        server.stop()


# -- read by a screen reader ------------------------------------------------------

TABLE_NAMES = {"paths": "Top paths", "source": "Sources", "browser": "Browsers", "os": "Operating systems",
               "device": "Devices", "event_type": "Custom events", "props": "Event properties"}


def test_every_table_is_named_by_its_heading_and_every_column_has_a_header(open_dashboard, server):
    dashboard = open_dashboard(server)
    dashboard.open()
    dashboard.wait_until_shown()
    for element_id, name in TABLE_NAMES.items():
        table = dashboard.page.get_by_role("table", name=name, exact=True)
        assert table.get_attribute("id") == element_id
        headers = table.get_by_role("columnheader").all_text_contents()
        assert len(headers) >= 2 and all(header.strip() for header in headers), (element_id, headers)


def test_the_charts_numbers_are_also_a_table_a_screen_reader_can_read(open_dashboard, server):
    dashboard = open_dashboard(server)
    dashboard.open()
    dashboard.wait_until_shown()
    table = dashboard.page.get_by_role("table", name="Views and unique users by day", exact=True)
    assert table.get_by_role("columnheader").all_text_contents() == ["Day", "Views", "Unique users"]
    rows = table.locator("tr:has(td)").evaluate_all("rows => rows.map(row => [...row.cells].map(c => c.textContent))")
    points = dashboard.server.get("/stats/timeseries", site_id=sorted(SITES)[0], interval="day",
                                  **{"from": (today() - timedelta(days=6)).isoformat(), "to": today().isoformat()})
    assert rows == [[p["date"], f"{p['views']:,}", f"{p['unique_users']:,}"] for p in points["points"]]
    # for the eye, the chart already says it: the table is shown in a box of one pixel, clipped
    box = table.evaluate("table => { const box = table.parentElement.getBoundingClientRect();"
                         " return [box.width, box.height, getComputedStyle(table.parentElement).overflow]; }")
    assert box == [1, 1, "hidden"]
    dashboard.assert_no_console_errors()


def test_the_status_line_is_a_live_region_before_it_has_anything_to_say(open_dashboard, server):
    # a screen reader announces changes to a live region it already knows; one that appears with its
    # message already in it is often read out by none
    dashboard = open_dashboard(server)
    dashboard.open()
    dashboard.wait_until_shown()
    assert dashboard.text("#status") == ""
    assert dashboard.page.get_by_role("status").count() == 1
    assert dashboard.page.evaluate("document.getElementById('status').getBoundingClientRect().height") == 0
    dashboard.assert_no_console_errors()


CONTRAST = """([selector, property, backdrop]) => {
  const channels = (colour) => colour.match(/[\\d.]+/g).map(Number);
  const luminance = (rgb) => {
    const [r, g, b] = rgb.map((c) => c / 255).map((c) => c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4);
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const shape = document.querySelector(selector);
  const style = getComputedStyle(shape);
  const back = channels(getComputedStyle(backdrop ? document.querySelector(backdrop) : shape.closest(".card"))
                        .backgroundColor);
  const opacity = Number(style.opacity);
  const front = channels(style[property]).slice(0, 3).map((c, i) => c * opacity + back[i] * (1 - opacity));
  const [light, dark] = [luminance(front), luminance(back)].sort((a, b) => b - a);
  return (light + 0.05) / (dark + 0.05);
}"""


@pytest.mark.parametrize("color_scheme", ["light", "dark"])
def test_the_charts_bars_and_line_stand_out_from_their_card(open_dashboard, server, color_scheme):
    # WCAG's 3:1 for the parts of a graphic one needs to read it
    dashboard = open_dashboard(server, color_scheme=color_scheme)
    dashboard.open()
    dashboard.wait_until_shown()
    for selector, colour in [("#chart .bar", "fill"), ("#chart .users", "stroke"), ("#chart .dot", "fill"),
                             (".swatch.views", "backgroundColor"), (".swatch.users", "backgroundColor")]:
        assert dashboard.page.evaluate(CONTRAST, [selector, colour]) >= 3, selector


@pytest.mark.parametrize("color_scheme", ["light", "dark"])
def test_the_edges_of_the_controls_stand_out_from_inside_and_outside(open_dashboard, server, color_scheme):
    # WCAG's 3:1 for what shows where a control is: its border, against its own background and the page's
    dashboard = open_dashboard(server, color_scheme=color_scheme)
    dashboard.open()
    dashboard.wait_until_shown()
    for control in ["#site", "#period"]:
        for backdrop in [control, "body"]:
            assert dashboard.page.evaluate(CONTRAST, [control, "borderTopColor", backdrop]) >= 3, (control, backdrop)
