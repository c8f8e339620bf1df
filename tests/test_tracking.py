"""Browser traffic: the Plausible Events API, cookieless visitors, enrichment and bots."""
import gzip
import logging
import os
import shutil
import sqlite3
import tracemalloc
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest

from store import open_store
from tracking import Visitors

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/156.0.0.0 Safari/537.36")
IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
          "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1")
PAGE = "http://example.test:8080"

# bodies exactly as the official trackers send them
PAGEVIEW = '{"n":"pageview","v":36,"u":"%s/","d":"example.test","r":null}' % PAGE
PAGEVIEW_UTM = ('{"n":"pageview","v":36,"u":"%s/pricing?utm_source=newsletter&utm_medium=spa#plans",'
                '"d":"example.test","r":"%s/pricing"}' % (PAGE, PAGE))
ENGAGEMENT = '{"n":"engagement","sd":100,"d":"example.test","u":"%s/blog/post-1","e":478,"v":36}' % PAGE
CUSTOM = ('{"n":"Signup","v":36,"u":"%s/pricing?utm_source=newsletter&utm_medium=spa#plans",'
          '"d":"example.test","r":"%s/pricing","p":{"plan":"pro"}}' % (PAGE, PAGE))
TAGGED = '{"n":"Trial Started","v":36,"u":"%s/pricing","d":"example.test","r":null,"p":{"plan":"pro"},"$":{}}' % PAGE
REVENUE = ('{"n":"Purchase","v":36,"u":"%s/pricing","d":"example.test","r":null,"p":{"plan":"pro"},'
           '"i":false,"$":{"amount":"29.00","currency":"EUR"}}' % PAGE)
LEGACY = '{"n":"pageview","u":"%s/pricing","d":"example.test","r":"%s/","w":1280,"h":0}' % (PAGE, PAGE)
LEGACY_CUSTOM = ('{"n":"Signup","u":"%s/pricing?utm_source=newsletter&utm_medium=spa#plans","d":"example.test",'
                 '"r":"%s/pricing","w":1280,"h":0,"p":"{\\"plan\\":\\"pro\\"}"}' % (PAGE, PAGE))


@pytest.fixture(autouse=True)
def received_at(monkeypatch):
    """The moment the API receives every event of a test: a browser is one visitor within a UTC day,
    so 00:00 UTC passing between two sends would make it two."""
    import ingest
    moment = datetime.now(timezone.utc)
    monkeypatch.setattr(ingest, "utc_now", lambda: moment)
    return moment


def send(client, body, user_agent=CHROME, ip="203.0.113.7", headers=None):
    return client.post("/api/event", data=body, content_type="text/plain",
                       headers={"User-Agent": user_agent, **(headers or {})},
                       environ_base={"REMOTE_ADDR": ip})


def rows(config, sql="SELECT site_id, event_type, path, visitor_id FROM events ORDER BY id"):
    return sqlite3.connect(config.database_path).execute(sql).fetchall()


@pytest.mark.parametrize("body", [PAGEVIEW, PAGEVIEW_UTM, ENGAGEMENT, CUSTOM, TAGGED, REVENUE,
                                  LEGACY, LEGACY_CUSTOM])
def test_every_tracker_body_is_accepted_like_plausible(client, body):
    response = send(client, body)
    assert response.status_code == 202
    assert response.data == b"ok" and response.mimetype == "text/plain"
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_an_oversized_body_gets_413_that_a_browser_can_read(client):
    response = send(client, '{"n":"pageview","u":"http://a.test/","d":"a.test","x":"%s"}' % ("x" * 70_000))
    assert response.status_code == 413
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_preflight_is_answered_204(client):
    response = client.open("/api/event", method="OPTIONS", headers={"Origin": PAGE})
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("body,field", [
    ("not json", "payload"), ("[1]", "payload"),
    ('{"u":"http://a.test/","d":"a.test"}', "name"),
    ('{"n":"pageview","d":"a.test"}', "url"),
    ('{"n":"pageview","u":"http://a.test/"}', "domain"),
    ('{"n":"pageview","u":"/relative","d":"a.test"}', "url"),
    ('{"n":"pageview","u":"http://[::1/unclosed","d":"a.test"}', "url"),
    ('{"n":"pageview","u":"http://a.test/","d":" , "}', "domain"),
    ('{"n":"%s","u":"http://a.test/","d":"a.test"}' % ("x" * 121), "name"),
    ('{"n":"pageview","u":"http://a.test/","d":"a.test","p":[1]}', "props"),
])
def test_invalid_events_get_plausibles_error_shape(client, body, field):
    response = send(client, body)
    assert response.status_code == 400
    assert field in response.get_json()["errors"]
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_mapping_into_our_events(client, drain, config):
    send(client, '{"n":"pageview","u":"https://www.shop.test/caf%C3%A9/menu?x=1#top",'
                 '"d":" www.Shop.test ,blog.test","r":null}')
    send(client, '{"n":"pageview","u":"https://shop.test/app#/settings","d":"shop.test","h":1}')
    drain()
    assert [row[:3] for row in rows(config)] == [
        ("shop.test", "page_view", "/café/menu"), ("blog.test", "page_view", "/café/menu"),
        ("shop.test", "page_view", "/app#/settings")]


def test_a_site_named_twice_in_d_gets_the_event_once(client, drain, config):
    send(client, '{"n":"pageview","u":"https://shop.test/","d":"shop.test,www.shop.test, Shop.test,blog.test"}')
    drain()
    assert [row[0] for row in rows(config)] == ["shop.test", "blog.test"]


def test_d_names_at_most_ten_sites_so_a_small_request_is_never_stored_hundreds_of_times(client):
    # each site gets the whole event, props and all: a 60 KB body naming 334 sites was 20 MB of queue
    ten = ",".join(f"site{number}.test" for number in range(10))
    assert send(client, '{"n":"pageview","u":"https://a.test/","d":"%s"}' % ten).status_code == 202
    response = send(client, '{"n":"pageview","u":"https://a.test/","d":"%s,site10.test"}' % ten)
    assert response.status_code == 400
    assert response.get_json() == {"errors": {"domain": ["must name at most 10 sites"]}}
    assert client.get("/health").get_json()["queue_size"] == 10


def test_engagement_is_kept_but_never_a_view_or_an_event(client, drain, config):
    send(client, PAGEVIEW)
    send(client, ENGAGEMENT)
    drain()
    assert rows(config, "SELECT scroll_depth, engaged_ms FROM events WHERE event_type = 'engagement'") == [(100, 478)]
    stats = client.get("/stats?site_id=example.test").get_json()
    assert stats["total_views"] == 1 and stats["unique_users"] == 1
    types = client.get("/stats/breakdown?site_id=example.test&property=event_type").get_json()["results"]
    assert [t["value"] for t in types] == ["page_view"]


def test_custom_events_and_their_props_can_be_broken_down(client, drain):
    for body in (CUSTOM, LEGACY_CUSTOM, TAGGED, PAGEVIEW):
        send(client, body)
    drain()
    plans = client.get("/stats/breakdown?site_id=example.test&property=props.plan").get_json()
    assert plans["results"] == [{"value": "pro", "views": 0, "events": 3, "unique_users": 1}]
    names = client.get("/stats/breakdown?site_id=example.test&property=event_type").get_json()["results"]
    assert {n["value"]: n["events"] for n in names} == {"Signup": 2, "Trial Started": 1, "page_view": 1}


def test_a_long_url_prop_of_a_file_download_is_kept(client, drain):
    url = "https://cdn.example.test/files/report.pdf?token=" + "a" * 1900
    send(client, '{"n":"File Download","v":36,"u":"%s/","d":"example.test","r":null,"p":{"url":"%s"}}' % (PAGE, url))
    drain()
    body = client.get("/stats/breakdown?site_id=example.test&property=props.url").get_json()
    assert [row["value"] for row in body["results"]] == [url]


def test_one_browser_is_one_visitor_and_the_ip_is_stored_nowhere(client, drain, config):
    for _ in range(3):
        send(client, PAGEVIEW, ip="198.51.100.23")
    send(client, PAGEVIEW, ip="198.51.100.24")
    send(client, PAGEVIEW, ip="198.51.100.23", user_agent=IPHONE)
    drain()
    assert client.get("/stats?site_id=example.test").get_json()["unique_users"] == 3
    for name in os.listdir(config.data_dir):
        with open(os.path.join(config.data_dir, name), "rb") as file:
            assert b"198.51.100.2" not in file.read(), name


def test_visitor_ids_change_with_the_daily_salt_and_old_salts_are_deleted(config):
    store = open_store(config)
    store.migrate()
    visitors = Visitors(store)
    day = datetime(2025, 6, 1, 12, tzinfo=timezone.utc)
    first = visitors.visitor_id("s", "192.0.2.1", CHROME, day)
    assert visitors.visitor_id("s", "192.0.2.1", CHROME, day + timedelta(hours=11)) == first
    assert visitors.visitor_id("t", "192.0.2.1", CHROME, day) != first
    assert Visitors(store).visitor_id("s", "192.0.2.1", CHROME, day) == first   # shared by processes
    second = visitors.visitor_id("s", "192.0.2.1", CHROME, day + timedelta(days=1))
    assert second != first
    visitors.visitor_id("s", "192.0.2.1", CHROME, day + timedelta(days=2))
    days = [row[0] for row in store.connection.execute("SELECT day FROM salts ORDER BY day")]
    assert days == ["2025-06-02", "2025-06-03"]


def test_a_days_salt_is_read_while_another_program_holds_the_database(config):
    """rebuild-rollups or an upgrade's migration holds SQLite's write lock for minutes: an API
    process started meanwhile must still get the day's salt (and the rate limit's key)."""
    from processes import hold_write_lock
    store = open_store(config)
    store.migrate()
    salt = store.daily_salt("2025-06-01", b"a" * 32, forget_before="2025-05-31")
    holder = hold_write_lock(config.database_path)
    try:
        assert store.daily_salt("2025-06-01", b"b" * 32, forget_before="2025-05-31") == salt
    finally:
        holder.rollback()


def trusting(config, proxies="10.0.0.0/8"):
    from ingestion_api import create_app
    from config import load_config
    trusted = load_config(environ={"TRUSTED_PROXIES": proxies}).trusted_proxies
    return create_app(config.with_overrides(trusted_proxies=trusted)).test_client()


def test_forwarded_headers_count_only_from_trusted_proxies(config, drain):
    client = trusting(config)
    # a client forging X-Forwarded-For directly is still one visitor
    send(client, PAGEVIEW, ip="203.0.113.9", headers={"X-Forwarded-For": "1.1.1.1"})
    send(client, PAGEVIEW, ip="203.0.113.9", headers={"X-Forwarded-For": "2.2.2.2"})
    # behind the trusted proxy, the forwarded address is the visitor
    send(client, PAGEVIEW, ip="10.1.2.3", headers={"X-Forwarded-For": "9.9.9.9, 198.51.100.1"})
    send(client, PAGEVIEW, ip="10.1.2.4", headers={"X-Forwarded-For": "198.51.100.1"})
    send(client, PAGEVIEW, ip="10.1.2.4", headers={"Forwarded": 'for="198.51.100.2:5000"'})
    drain()
    visitors = {row[3] for row in rows(config)}
    assert len(visitors) == 3


def test_a_trusted_proxy_is_recognised_on_a_dual_stack_socket(config, drain, received_at):
    client = trusting(config)
    # gunicorn bound to [::] sees an IPv4 peer as an IPv4-mapped IPv6 address
    for real in ("198.51.100.1", "198.51.100.2"):
        send(client, PAGEVIEW, ip="::ffff:10.1.2.3", headers={"X-Forwarded-For": real})
    send(client, PAGEVIEW, ip="10.1.2.3", headers={"X-Forwarded-For": "::ffff:198.51.100.1"})
    drain()
    visitors = Visitors(open_store(config))
    assert [row[3] for row in rows(config)] == [
        visitors.visitor_id("example.test", ip, CHROME, received_at)
        for ip in ("198.51.100.1", "198.51.100.2", "198.51.100.1")]


def test_a_proxy_on_a_unix_socket_is_trusted_when_named_unix(config, drain, caplog, received_at):
    # gunicorn -b unix:... gives the peer no address: REMOTE_ADDR is ""
    for proxies in ("10.0.0.0/8", "unix"):
        client = trusting(config, proxies)
        for real in ("198.51.100.1", "198.51.100.2"):
            send(client, PAGEVIEW, ip="", headers={"X-Forwarded-For": real})
    drain()
    visitors = Visitors(open_store(config))
    assert [row[3] for row in rows(config)] == [
        visitors.visitor_id("example.test", ip, CHROME, received_at)
        for ip in ("", "", "198.51.100.1", "198.51.100.2")]
    # without unix, every visitor is one: the operator is told how to name the proxy
    assert caplog.text.count("add unix to TRUSTED_PROXIES") == 1


@pytest.mark.parametrize("proxy_writes,client_sends", [
    ("X-Forwarded-For", {"Forwarded": "for=6.6.6.6"}),
    ("Forwarded", {"X-Forwarded-For": "6.6.6.6"}),
])
def test_a_client_cannot_forge_its_address_in_the_header_its_proxy_does_not_write(
        config, drain, caplog, received_at, proxy_writes, client_sends):
    client = trusting(config)
    # the proxy passes the client's own header on untouched and writes the other one
    for real in ("198.51.100.1", "198.51.100.2"):
        value = real if proxy_writes == "X-Forwarded-For" else f"for={real}"
        send(client, PAGEVIEW, ip="10.1.2.3", headers={**client_sends, proxy_writes: value})
    drain()

    def visitor(ip):
        return Visitors(open_store(config)).visitor_id("example.test", ip, CHROME, received_at)
    # which of the two the proxy wrote cannot be told: neither is believed
    assert [row[3] for row in rows(config)] == [visitor("10.1.2.3")] * 2
    # and the operator is told how to set the proxy right, once, not per request
    assert caplog.text.count("carried both Forwarded and X-Forwarded-For") == 1


@pytest.mark.parametrize("user_agent", [
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/156.0.0.0 Safari/537.36",
    ""])
def test_bots_are_dropped_visibly(client, config, user_agent):
    response = send(client, PAGEVIEW, user_agent=user_agent)
    assert response.status_code == 202
    assert response.headers["X-Analytics-Dropped"] == "bot"
    assert client.get("/health").get_json()["queue_size"] == 0


def test_an_api_process_keeps_at_most_512_characters_of_each_user_agent_it_has_seen(client):
    """Anyone may send a new User-Agent of 8 KB (gunicorn's limit for a header) with every event:
    what a process keeps per User-Agent (the bot check's cache, ua-parser's own) would then grow
    to tens of MB in each API worker."""
    send(client, PAGEVIEW, user_agent=CHROME + " first")      # ua-parser's rules load once
    tracemalloc.start()
    try:
        for i in range(100):
            assert send(client, PAGEVIEW, user_agent=f"{CHROME} {i:03d} " + "x" * 8000).status_code == 202
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept < 100 * 8000


@pytest.fixture
def listed_client(config):
    from ingestion_api import create_app
    return create_app(config.with_overrides(sites=frozenset({"example.test", "www.Shop.test"}))).test_client()


def test_an_event_for_a_domain_not_in_sites_is_dropped_visibly(listed_client, caplog):
    caplog.set_level(logging.INFO, logger="ingestion_api")
    response = send(listed_client, '{"n":"pageview","u":"http://junk.test/","d":"junk.test"}')
    assert response.status_code == 202 and response.data == b"ok"
    assert response.headers["X-Analytics-Dropped"] == "unknown-site"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert listed_client.get("/health").get_json()["queue_size"] == 0
    assert "dropped event reason=unknown-site sites='junk.test'" in caplog.text
    assert 'analytics_events_dropped_total{reason="unknown-site"} 1.0' in \
        listed_client.get("/metrics").get_data(as_text=True)


def test_of_the_domains_in_d_only_those_in_sites_get_the_event(listed_client, drain, config, caplog):
    caplog.set_level(logging.INFO, logger="ingestion_api")
    response = send(listed_client, '{"n":"pageview","u":"http://example.test/","d":"junk.test,example.test,x.test"}')
    assert response.status_code == 202
    assert "X-Analytics-Dropped" not in response.headers
    drain()
    assert [row[0] for row in rows(config)] == ["example.test"]
    assert "dropped event reason=unknown-site sites='junk.test,x.test'" in caplog.text
    assert 'analytics_events_dropped_total{reason="unknown-site"} 2.0' in \
        listed_client.get("/metrics").get_data(as_text=True)


@pytest.mark.parametrize("domain", ["shop.test", "www.shop.test", " Shop.test", "WWW.SHOP.TEST"])
def test_a_domain_matches_sites_after_the_normalisation_d_always_gets(listed_client, drain, config, domain):
    response = send(listed_client, '{"n":"pageview","u":"http://shop.test/","d":"%s"}' % domain)
    assert "X-Analytics-Dropped" not in response.headers
    drain()
    assert [row[0] for row in rows(config)] == ["shop.test"]


def test_a_bot_is_dropped_as_a_bot_whatever_its_domain(listed_client):
    response = send(listed_client, '{"n":"pageview","u":"http://junk.test/","d":"junk.test"}',
                    user_agent="Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)")
    assert response.headers["X-Analytics-Dropped"] == "bot"


def test_an_invalid_event_for_a_domain_not_in_sites_is_still_a_400(listed_client):
    response = send(listed_client, '{"n":"pageview","d":"junk.test"}')
    assert response.status_code == 400
    assert "url" in response.get_json()["errors"]


def test_without_sites_every_domain_is_taken(client, drain, config):
    response = send(client, '{"n":"pageview","u":"http://junk.test/","d":"junk.test"}')
    assert "X-Analytics-Dropped" not in response.headers
    drain()
    assert [row[0] for row in rows(config)] == ["junk.test"]


def test_sources_utm_tags_and_devices_are_worked_out_by_the_processor(client, drain):
    send(client, '{"n":"pageview","u":"%s/a","d":"example.test","r":"https://www.news.test/story"}' % PAGE)
    send(client, PAGEVIEW_UTM, user_agent=IPHONE, ip="192.0.2.50")          # internal referrer, utm wins
    send(client, '{"n":"pageview","u":"%s/b","d":"example.test","r":"%s/a"}' % (PAGE, PAGE), ip="192.0.2.51")
    drain()

    def breakdown(prop):
        body = client.get(f"/stats/breakdown?site_id=example.test&property={prop}").get_json()
        return {result["value"]: result["views"] for result in body["results"]}
    assert breakdown("source") == {"news.test": 1, "newsletter": 1, None: 1}
    assert breakdown("referrer") == {"https://www.news.test/story": 1}
    assert breakdown("utm_source") == {"newsletter": 1}
    assert breakdown("utm_medium") == {"spa": 1}
    assert breakdown("browser") == {"Chrome": 2, "Mobile Safari": 1}
    assert breakdown("os") == {"Windows": 2, "iOS": 1}
    assert breakdown("device") == {"desktop": 2, "mobile": 1}


def test_a_referrer_from_the_page_s_own_host_is_no_source_whatever_d_says(client, drain):
    # a rollup site in d, and a site whose d is not its host name
    send(client, '{"n":"pageview","u":"https://shop.test/b","d":"shop.test,rollup.test","r":"https://shop.test/a"}')
    send(client, '{"n":"pageview","u":"https://www.app.io/b","d":"rollup.test","r":"https://app.io/a"}')
    send(client, '{"n":"pageview","u":"https://app.io/c","d":"rollup.test","r":"https://news.test/"}')
    drain()
    for site in ("shop.test", "rollup.test"):
        body = client.get(f"/stats/breakdown?site_id={site}&property=source").get_json()
        assert {row["value"]: row["views"] for row in body["results"]} == (
            {None: 1} if site == "shop.test" else {None: 2, "news.test": 1})


def test_a_page_with_many_query_fields_is_stored_with_its_utm_tags(client, drain):
    fields = "&".join(f"f{number}=1" for number in range(60))
    send(client, PAGEVIEW.replace('/"', f'/?{fields}&utm_source=mail"'))
    send(client, PAGEVIEW)
    drain()
    assert client.get("/stats?site_id=example.test").get_json()["total_views"] == 2
    breakdown = client.get("/stats/breakdown?site_id=example.test&property=utm_source").get_json()
    assert [(row["value"], row["views"]) for row in breakdown["results"]] == [("mail", 1)]


def test_an_event_enrichment_fails_on_is_stored_without_it(client, drain, monkeypatch, caplog):
    import enrich

    def broken(user_agent):
        raise RuntimeError("a rule that cannot parse this User-Agent")
    monkeypatch.setattr(enrich, "describe_user_agent", broken)
    send(client, PAGEVIEW)
    drain()
    stats = client.get("/stats?site_id=example.test").get_json()
    assert (stats["total_views"], stats["unique_users"]) == (1, 1)
    assert "enrichment failed" in caplog.text


def test_tracker_script_is_small_javascript(client):
    response = client.get("/js/script.js", headers={"Accept-Encoding": "gzip"})
    assert response.status_code == 200
    assert response.mimetype == "application/javascript"
    assert response.headers["Content-Encoding"] == "gzip"
    assert len(response.data) < 1024
    source = gzip.decompress(response.data).decode()
    assert "/api/event" in source and "pushState" in source and "keepalive" in source
    plain = client.get("/js/script.js")
    assert plain.data.decode() == source
    assert client.get("/js/script.js", headers={"If-None-Match": plain.headers["ETag"]}).status_code == 304
    assert response.headers["ETag"] != plain.headers["ETag"]           # two bodies, two tags
    refused = client.get("/js/script.js", headers={"Accept-Encoding": "identity, gzip;q=0"})
    assert "Content-Encoding" not in refused.headers and refused.data.decode() == source


def test_event_is_503_not_500_when_the_database_file_is_not_a_database(client, config):
    Path(config.database_path).write_bytes(b"not a database" * 1000)
    response = send(client, PAGEVIEW)
    assert response.status_code == 503
    assert "error" in response.get_json()
    assert client.post("/event", json={"site_id": "s", "event_type": "page_view"}).status_code == 200


def test_event_is_503_not_500_when_the_visitor_salts_cannot_be_read(client, config):
    shutil.rmtree(config.data_dir)
    response = send(client, PAGEVIEW)
    assert response.status_code == 503
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "error" in response.get_json()


@pytest.mark.parametrize("body, status", [
    ('{"n":"%s","u":"http://a.test/","d":"a.test"}' % ("x" * 120), 202),
    ('{"n":"%s","u":"http://a.test/","d":"a.test"}' % ("x" * 121), 400),
    ('{"n":"pageview","u":"http://a.test/%s","d":"a.test"}' % ("p" * (2000 - 14)), 202),
    ('{"n":"pageview","u":"http://a.test/%s","d":"a.test"}' % ("p" * (2000 - 13)), 400),
], ids=["name of 120", "name of 121", "url of 2000", "url of 2001"])
def test_plausible_s_limits_are_a_name_of_120_and_a_url_of_2000_characters(client, body, status):
    assert send(client, body).status_code == status


def test_the_long_field_names_plausible_accepts_are_read_as_the_short_ones(client, drain, config):
    short = ('{"n":"Signup","u":"https://shop.test/app#/plans","d":"shop.test","r":"https://news.test/",'
             '"p":{"plan":"pro"},"h":1}')
    send(client, short)
    send(client, '{"name":"Signup","url":"https://shop.test/app#/plans","domain":"shop.test",'
                 '"referrer":"https://news.test/","props":{"plan":"pro"},"hashMode":1}')
    send(client, short.replace('"p"', '"m"'))
    send(client, short.replace('"p"', '"meta"'))
    drain()
    assert rows(config, "SELECT site_id, event_type, path, referrer, props FROM events ORDER BY id") == [
        ("shop.test", "Signup", "/app#/plans", "https://news.test/", '{"plan":"pro"}')] * 4


@pytest.mark.parametrize("scroll_depth, engaged_ms, stored", [
    (55, 478, (55, 478)),
    (150, -1, (100, 0)),
    (-3, 10**12, (0, 86_400_000)),
    (42.7, 478.9, (42, 478)),
    ('"50"', "true", (None, None)),
    ("null", "[1]", (None, None)),
])
def test_engagement_keeps_a_scroll_depth_of_0_to_100_and_at_most_a_day_engaged(
        client, drain, config, scroll_depth, engaged_ms, stored):
    send(client, ENGAGEMENT.replace('"sd":100', f'"sd":{scroll_depth}').replace('"e":478', f'"e":{engaged_ms}'))
    drain()
    assert rows(config, "SELECT scroll_depth, engaged_ms FROM events") == [stored]


def test_props_keep_string_and_number_values_as_strings_and_leave_out_the_rest(client, drain, config):
    send(client, '{"n":"Signup","u":"%s/","d":"example.test","p":{"plan":"pro","seats":3,"price":9.5,'
                 '"trial":true,"coupon":null,"tags":["a"],"extra":{"x":1},"bad/key":"x","nul":"a\\u0000b"}}' % PAGE)
    send(client, '{"n":"Signup","u":"%s/","d":"example.test","p":{"trial":false}}' % PAGE)
    drain()
    assert rows(config, "SELECT props FROM events ORDER BY id") == [('{"plan":"pro","seats":"3","price":"9.5"}',), (None,)]


def test_an_event_keeps_the_first_30_of_its_props(client, drain, config):
    props = ",".join(f'"k{number:02d}":"v"' for number in range(40))
    send(client, '{"n":"Signup","u":"%s/","d":"example.test","p":{%s}}' % (PAGE, props))
    drain()
    [(stored,)] = rows(config, "SELECT props FROM events ORDER BY id")
    assert list(orjson.loads(stored)) == [f"k{number:02d}" for number in range(30)]


def test_a_referrer_with_a_nul_character_is_left_out_and_its_event_kept(client, drain, config):
    send(client, '{"n":"pageview","u":"%s/","d":"example.test","r":"https://news.test/\\u0000x"}' % PAGE)
    drain()
    assert rows(config, "SELECT event_type, referrer, source FROM events") == [("page_view", None, None)]


@pytest.mark.parametrize("url, referrer, source", [
    ("https://example.test/", "https://news.test/story", "news.test"),
    ("https://example.test/", "https://www.news.test/story", "news.test"),
    ("https://example.test/", "https://blog.example.test/post", None),      # a subdomain of the site
    ("https://example.test/", "https://www.example.test/", None),
    ("https://example.test/?utm_source=mail", "https://news.test/story", "mail"),    # the tag wins
    ("https://example.test/?utm_source=mail", None, "mail"),
])
def test_the_source_is_the_utm_source_else_the_referring_host_outside_the_site(client, drain, url, referrer, source):
    send(client, orjson.dumps({"n": "pageview", "u": url, "d": "example.test", "r": referrer}))
    drain()
    body = client.get("/stats/breakdown?site_id=example.test&property=source").get_json()
    assert [row["value"] for row in body["results"]] == [source]


@pytest.mark.parametrize("user_agent, device", [
    (CHROME, "desktop"),
    (IPHONE, "mobile"),
    (IPHONE.replace("iPhone; CPU iPhone OS", "iPad; CPU OS"), "tablet"),
    ("Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 "
     "Mobile Safari/537.36", "mobile"),
    # an Android tablet's browser leaves Mobile out: Chrome's reduced User-Agent says nothing else
    ("Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 "
     "Safari/537.36", "tablet"),
    ("Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 "
     "Safari/537.36", "tablet"),
    ("Mozilla/5.0 (Android 13; Tablet; rv:120.0) Gecko/120.0 Firefox/120.0", "tablet"),
    ("Mozilla/5.0 (Android 13; Mobile; rv:120.0) Gecko/120.0 Firefox/120.0", "mobile"),
])
def test_the_device_is_desktop_mobile_or_tablet(client, drain, user_agent, device):
    send(client, PAGEVIEW, user_agent=user_agent)
    drain()
    body = client.get("/stats/breakdown?site_id=example.test&property=device").get_json()
    assert [row["value"] for row in body["results"]] == [device]
