"""The contract every queue and store keeps, run on each combination with the real services."""
import random
import sqlite3
import sys
from datetime import date, datetime, timedelta, timezone

import orjson
import psycopg
import pytest

from enrich import NOTHING
from events import encode_event, validate_event
from processor import Processor
from reports import Period
from rollups import PROPERTIES
from shared_queue import QueueUnavailable, open_queue
from store import StoreUnavailable, open_store

ALL_BACKENDS = True
FIRST_DAY = date(2025, 3, 1)
CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0 Safari/537.36"
IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
          "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1")


def generated_lines(count, seed=11):
    """Events as both APIs queue them: user ids, visitors, props, engagement, no path."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        day = FIRST_DAY + timedelta(days=rng.randrange(4))
        event = validate_event({
            "site_id": rng.choice(["big", "big", "small"]),
            "event_type": rng.choice(["page_view"] * 5 + ["click", "Signup", "engagement"]),
            "path": rng.choice([None, "/", "/a", "/B", "/é"]),
            "user_id": rng.choice([None, None] + [f"u{n}" for n in range(15)]),
            "timestamp": f"{day.isoformat()}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:00Z"})
        if event["user_id"] is None:
            event.update(visitor_id=f"v{rng.randrange(10)}", ua=rng.choice([CHROME, IPHONE]),
                         referrer=rng.choice([None, "https://news.test/x", "https://big/y",
                                              "https://search.test/?q=a"]),
                         query=rng.choice([None, "utm_source=mail&utm_campaign=spring&utm_medium=email",
                                           "utm_source=news&utm_medium=social&utm_campaign=fall"]),
                         props=rng.choice([None, {"plan": rng.choice(["pro", "free"])},
                                           {"plan": "pro", "Seats": str(rng.randrange(3)), "b-2": ""}]))
        lines.append(encode_event(event))
    return lines


def processor_for(config, batch_size=37):
    settings = config.with_overrides(processor_batch_size=batch_size)
    processor = Processor(open_queue(settings), open_store(settings), settings)
    processor.start()
    return processor


@pytest.fixture
def loaded(config):
    lines = generated_lines(1500)
    open_queue(config).append(lines)
    processor_for(config).run(once=True)
    store = open_store(config)
    connection = store.connect(readonly=True)
    yield store.reports(connection), store.reports(connection, raw=True)
    connection.close()
    store.close()


PERIODS = [Period(), Period(FIRST_DAY, FIRST_DAY), Period(FIRST_DAY, FIRST_DAY + timedelta(days=2))]


def test_every_report_from_rollups_equals_raw_events(loaded):
    rollup, raw = loaded
    for site in ("big", "small", "absent"):
        for period in PERIODS:
            assert rollup.stats(site, period, 3) == raw.stats(site, period, 3)
            for prop in (*PROPERTIES, "props.plan", "props.Seats", "props.b-2"):
                assert rollup.breakdown(site, prop, period, 4) == raw.breakdown(site, prop, period, 4)
            for limit in (1, 2, 10):
                assert rollup.prop_keys(site, period, limit) == raw.prop_keys(site, period, limit)
            if not period.all_time:
                for interval in ("day", "hour"):
                    assert rollup.timeseries(site, period, interval) == raw.timeseries(site, period, interval)
    assert rollup.stats("big", Period())["total_views"] > 0
    # every property has values to compare, not two empty lists
    assert [prop for prop in PROPERTIES if len(raw.breakdown("big", prop, Period(), 4)) < 2] == []
    # byte order, as the breakdowns': upper case before lower, whatever PostgreSQL's collation
    assert rollup.prop_keys("big", Period()) == ["Seats", "b-2", "plan"]
    assert rollup.prop_keys("absent", Period()) == []
    assert rollup.prop_keys("big", Period(date(2024, 1, 1), date(2024, 1, 1))) == []


def test_an_event_delivered_twice_is_stored_once(config):
    lines = generated_lines(40, seed=3)
    queue = open_queue(config)
    queue.append(lines)
    queue.append(lines[:10])                       # a redelivery of the same accepted events
    processor_for(config).run(once=True)
    store = open_store(config)
    connection = store.connect(readonly=True)
    stored = connection.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
    counted = store.reports(connection).breakdown("big", "event_type", Period(), 100)
    raw = store.reports(connection, raw=True).breakdown("big", "event_type", Period(), 100)
    connection.close()
    store.close()
    assert tuple(stored) == (40, 40)
    assert counted == raw


def test_a_report_connection_sees_one_snapshot_until_it_is_released(config):
    queue = open_queue(config)
    queue.append(generated_lines(40, seed=5))
    processor = processor_for(config, batch_size=20)
    processor.step()
    store = open_store(config)
    reader = store.reader()
    first = store.reports(reader).stats("big", Period())
    processor.run(once=True)                        # commits while the report is under way
    assert store.reports(reader).stats("big", Period()) == first
    store.release(reader)
    reader = store.reader()
    assert store.reports(reader).stats("big", Period())["total_views"] > first["total_views"]
    store.release(reader)
    store.close()


def test_queue_size_counts_what_is_not_yet_stored(config):
    queue = open_queue(config)
    queue.append(generated_lines(25))
    assert queue.size() == 25
    processor = processor_for(config, batch_size=10)
    processor.step()
    assert queue.size() == 15
    processor.run(once=True)
    assert queue.size() == 0


def test_a_batch_that_failed_to_store_is_stored_later_not_lost(config):
    open_queue(config).append(generated_lines(30))
    processor = processor_for(config, batch_size=10)
    real_write = processor.store.write

    def failing_write(rows, name, checkpoint):
        raise StoreUnavailable("database went away")
    processor.store.write = failing_write
    with pytest.raises(StoreUnavailable):
        processor.step()
    assert open_queue(config).size() == 30     # read, not stored: still waiting
    processor.store.write = real_write
    processor.run(once=True)
    store = open_store(config)
    connection = store.connect(readonly=True)
    assert connection.execute("SELECT count(*) FROM events").fetchone()[0] == 30
    connection.close()
    store.close()


def test_a_restarted_processor_goes_on_after_what_was_stored(config):
    queue = open_queue(config)
    queue.append([b"not an event\n"] + generated_lines(20))
    processor_for(config).run(once=True)
    restarted = processor_for(config)
    assert queue.size() == 0
    restarted.run(once=True)
    with open(config.dead_letter_path, "rb") as letters:
        assert len(letters.readlines()) == 1        # the bad line was read once, not again


def page_view_row(event_id, site_id="s"):
    """A row as the processor stores it (ROW_COLUMNS): the event's columns, its id, nothing enriched."""
    return (site_id, "page_view", "/", None, "2025-03-01T12:00:00.000Z", event_id) + NOTHING


def test_a_write_that_fails_leaves_nothing_of_itself_and_the_next_write_is_stored(config):
    store = open_store(config)
    store.migrate()
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
        store.write([page_view_row("e1"), page_view_row("e2", site_id=None)], "q", "after the failed batch")
    store.write([page_view_row("e3")], "q", "after the next batch")
    connection = store.connect(readonly=True)
    assert connection.execute("SELECT event_id FROM events").fetchall() == [("e3",)]
    connection.close()
    assert store.checkpoint("q") == "after the next batch"
    store.close()


# fields of queued lines of types, or with characters, that no API queues; each one made the
# batch's write fail on every retry, and the processor stored nothing more
NOT_QUEUED_BY_ANY_API = [{"id": {"a": 1}}, {"id": [1]}, {"visitor_id": {"a": 1}}, {"props": [1, 2]},
                         {"props": "plan"}, {"props": {"plan": {"a": 1}}}, {"props": {"plan": "pro\x00"}},
                         {"scroll_depth": {"a": 1}}, {"scroll_depth": "deep"}, {"engaged_ms": 3_000_000_000},
                         {"site_id": "s\x00"}, {"path": "/\x00"}, {"visitor_id": "v\x00"},
                         {"referrer": "https://news.test/\x00"}]


def test_lines_no_api_queues_go_to_the_dead_letter_file_and_the_events_after_them_are_stored(config):
    event = {"site_id": "s", "event_type": "page_view", "path": "/", "user_id": None,
             "timestamp": "2025-03-01T12:00:00.000Z", "visitor_id": "v", "ua": CHROME}
    strange = [orjson.dumps({**event, "id": f"strange-{number}", **fields}, option=orjson.OPT_APPEND_NEWLINE)
               for number, fields in enumerate(NOT_QUEUED_BY_ANY_API)]
    open_queue(config).append(strange + generated_lines(5))
    processor = processor_for(config, batch_size=100)
    assert processor.step() == len(strange) + 5
    assert processor.dead == len(strange)
    store = open_store(config)
    connection = store.connect(readonly=True)
    assert connection.execute("SELECT count(*) FROM events").fetchone()[0] == 5
    connection.close()
    store.close()
    processor.close()


def test_schema_migrations_are_idempotent(config):
    store = open_store(config)
    assert store.migrate() == store.migrate()
    store.close()


def test_salts_are_shared_through_the_store(config):
    store = open_store(config)
    store.migrate()
    first = store.daily_salt("2025-01-02", b"a" * 32, forget_before="2025-01-01")
    assert store.daily_salt("2025-01-02", b"b" * 32, forget_before="2025-01-01") == first == b"a" * 32
    store.close()


def test_an_unreachable_queue_answers_503_and_health_says_unhealthy(config):
    from ingestion_api import create_app
    if config.queue_path.startswith("redis://"):
        broken = config.with_overrides(queue_url="redis://127.0.0.1:1/0?stream=nowhere")
    else:
        broken = config.with_overrides(queue_url="/nonexistent/dir/event_queue.jsonl")
    client = create_app(broken).test_client()
    response = client.post("/event", json={"site_id": "s", "event_type": "page_view"})
    assert response.status_code == 503 and "error" in response.get_json()
    health = client.get("/health")
    assert health.status_code == 503 and health.get_json()["status"] == "unhealthy"
    with pytest.raises(QueueUnavailable):
        open_queue(broken).append([b"{}\n"])


def visit(user, timestamp, site="s"):
    return encode_event(validate_event({"site_id": site, "event_type": "page_view", "path": "/",
                                        "user_id": user, "timestamp": timestamp}))


def reports_of(config):
    store = open_store(config)
    connection = store.connect(readonly=True)
    return store, connection, store.reports(connection), store.reports(connection, raw=True)


def test_a_user_seen_in_several_hours_of_a_day_counts_once_for_the_day_and_once_per_hour(config):
    day = Period(FIRST_DAY, FIRST_DAY)
    open_queue(config).append([visit("u1", "2025-03-01T09:10:00Z"), visit("u1", "2025-03-01T09:50:00Z"),
                               visit("u1", "2025-03-01T14:00:00Z"), visit("u2", "2025-03-01T14:30:00Z")])
    processor_for(config, batch_size=1).run(once=True)     # the hours arrive in separate batches
    store, connection, rollup, raw = reports_of(config)
    hours = {point["date"]: point["unique_users"] for point in rollup.timeseries("s", day, "hour")}
    assert rollup.stats("s", day)["unique_users"] == 2
    assert rollup.timeseries("s", day, "day")[0]["unique_users"] == 2
    assert hours["2025-03-01T09:00:00Z"] == 1 and hours["2025-03-01T14:00:00Z"] == 2
    assert sum(hours.values()) == 3
    assert rollup.timeseries("s", day, "hour") == raw.timeseries("s", day, "hour")
    connection.close()
    store.close()


def test_a_user_seen_on_two_days_counts_once_over_the_range_and_once_each_day(config):
    open_queue(config).append([visit("u1", "2025-03-01T23:59:00Z"), visit("u1", "2025-03-02T00:01:00Z"),
                               visit("u2", "2025-03-02T08:00:00Z")])
    processor_for(config).run(once=True)
    store, connection, rollup, _ = reports_of(config)
    both_days = Period(FIRST_DAY, FIRST_DAY + timedelta(days=1))
    assert rollup.stats("s", both_days)["unique_users"] == 2
    assert [point["unique_users"] for point in rollup.timeseries("s", both_days, "day")] == [1, 2]
    connection.close()
    store.close()


def test_each_days_user_count_equals_the_raw_distinct_count_after_batches_that_revisit_users(config):
    rng = random.Random(5)
    queue = open_queue(config)
    for _ in range(6):          # each round revisits the same users in other batches and hours
        queue.append([visit(f"u{rng.randrange(12)}", f"2025-03-0{rng.randrange(1, 4)}T"
                            f"{rng.randrange(24):02d}:00:00Z", site=rng.choice(["s", "t"]))
                      for _ in range(40)])
        processor_for(config, batch_size=7).run(once=True)
    store, connection, rollup, raw = reports_of(config)
    for site in ("s", "t"):
        for offset in range(4):
            day = Period(FIRST_DAY + timedelta(days=offset), FIRST_DAY + timedelta(days=offset))
            assert rollup.stats(site, day) == raw.stats(site, day)
            assert rollup.timeseries(site, day, "hour") == raw.timeseries(site, day, "hour")
        days = Period(FIRST_DAY, FIRST_DAY + timedelta(days=3))
        assert rollup.timeseries(site, days, "day") == raw.timeseries(site, days, "day")
        assert rollup.stats(site, days) == raw.stats(site, days)
    connection.close()
    store.close()


def test_migration_from_the_hourly_user_set_keeps_every_report(config):
    """A store of the previous version kept hourly_users; upgrading builds the day tables from it."""
    open_queue(config).append(generated_lines(600))
    processor_for(config).run(once=True)
    store = open_store(config)
    latest = store.migrate()
    migrations = sys.modules[type(store).__module__].MIGRATIONS
    day_sets = next(number for number, migration in enumerate(migrations)
                    if "CREATE TABLE daily_users" in migration)
    with store.atomic() as connection:      # back to the version before the day sets, as it would have been
        connection.execute("DROP INDEX IF EXISTS daily_values_ranked")     # SQLite's next migration
        connection.execute("CREATE TABLE hourly_users (site_id TEXT NOT NULL, hour TEXT NOT NULL, "
                           "user_id TEXT NOT NULL, PRIMARY KEY (site_id, hour, user_id))")
        connection.execute("INSERT INTO hourly_users SELECT DISTINCT site_id, substr(timestamp, 1, 13), "
                           "coalesce(user_id, visitor_id) FROM events WHERE event_type != 'engagement' "
                           "AND coalesce(user_id, visitor_id) IS NOT NULL")
        connection.execute("DROP TABLE daily_users")
        connection.execute("DROP TABLE daily_totals")
        set_schema_version(connection, config, day_sets)
    assert store.migrate() == latest
    store.close()
    store, connection, rollup, raw = reports_of(config)
    assert connection.execute("SELECT count(*) FROM daily_users").fetchone()[0] > 0
    for site in ("big", "small"):
        for period in PERIODS[1:] + [Period(FIRST_DAY + timedelta(days=3), FIRST_DAY + timedelta(days=3))]:
            assert rollup.stats(site, period) == raw.stats(site, period)
            for interval in ("day", "hour"):
                assert rollup.timeseries(site, period, interval) == raw.timeseries(site, period, interval)
    connection.close()
    store.close()


def test_a_store_a_newer_version_migrated_is_refused_and_left_as_it_is(config):
    """Rolled back to, this version would not keep the newer one's tables: its processor stores
    nothing (the events wait in the queue for the newer version) and says why."""
    from store import migrate_store
    open_queue(config).append(generated_lines(30))
    store = open_store(config)
    latest = store.migrate()
    with store.atomic() as connection:
        set_schema_version(connection, config, latest + 1)
    with pytest.raises(StoreUnavailable, match=f"schema version {latest + 1}.* newer") as refused:
        processor_for(config)
    assert refused.value.lasting
    assert migrate_store(config) is None        # the API takes events all the same
    assert open_queue(config).size() == 30
    with store.atomic() as connection:
        set_schema_version(connection, config, latest)
    processor_for(config).run(once=True)
    assert open_queue(config).size() == 0
    connection = store.connect(readonly=True)
    assert connection.execute("SELECT count(*) FROM events").fetchone()[0] == 30
    connection.close()
    store.close()


def wide(count, first=0x20000):
    """count different characters of four bytes each in UTF-8 (CJK Extension B)."""
    return "".join(chr(first + offset) for offset in range(count))


def test_the_longest_values_the_apis_accept_are_stored_and_reported_exactly(client, config):
    """Every key of a rollup row holding them would be kilobytes long: a batch must still be stored."""
    site, user, key = wide(256), wide(256, 0x21000), "k" * 64
    path = "/" + wide(2047, 0x22000)
    first_day = datetime.now(timezone.utc).date()
    assert client.post("/event", json={"site_id": site, "event_type": "page_view", "path": path,
                                       "user_id": user}).status_code == 200
    assert client.post("/event", json={"site_id": site, "event_type": wide(256, 0x23000),
                                       "user_id": user}).status_code == 200
    utm = "&".join(f"utm_{tag}={wide(256, first)}" for tag, first in
                   (("source", 0x24000), ("medium", 0x25000), ("campaign", 0x26000)))
    browser_event = {"n": "Signup", "d": site, "u": f"http://a.test/{wide(1150, 0x27000)}?{utm}",
                     "r": f"http://{wide(1990, 0x28000)}/", "p": {key: wide(256, 0x29000)}}
    assert client.post("/api/event", json=browser_event, headers={"User-Agent": CHROME}).status_code == 202
    assert client.post("/event", json={"site_id": "s", "event_type": "page_view", "path": "/"}).status_code == 200
    assert processor_for(config).step() == 4        # one batch, whose failure would be raised here
    store, connection, rollup, raw = reports_of(config)
    assert connection.execute("SELECT count(*) FROM events").fetchone()[0] == 4
    assert rollup.stats(site, Period()) == {"total_views": 1, "unique_users": 2,
                                            "top_paths": [{"path": path, "views": 1}]}
    assert rollup.stats("s", Period())["total_views"] == 1
    assert rollup.breakdown(site, "props." + key, Period()) == [
        {"value": wide(256, 0x29000), "views": 0, "events": 1, "unique_users": 1}]
    received = Period(first_day, datetime.now(timezone.utc).date())   # the day or two they came on
    assert rollup.stats(site, received) == rollup.stats(site, Period())
    for prop in list(PROPERTIES) + ["props." + key]:
        for period in (Period(), received):
            assert rollup.breakdown(site, prop, period) == raw.breakdown(site, prop, period)
    assert rollup.timeseries(site, received, "hour") == raw.timeseries(site, received, "hour")
    connection.close()
    store.close()


@pytest.mark.parametrize("key", ["x :y", ":y", "a.b:c-d e"])
def test_every_valid_props_key_is_reported_alike_from_rollups_and_raw_events(client, drain, config, key):
    event = {"n": "Signup", "d": "a.test", "u": "http://a.test/", "p": {key: "pro"}}
    assert client.post("/api/event", json=event, headers={"User-Agent": CHROME}).status_code == 202
    drain()
    store, connection, rollup, raw = reports_of(config)
    expected = [{"value": "pro", "views": 0, "events": 1, "unique_users": 1}]
    assert rollup.breakdown("a.test", "props." + key, Period()) == expected
    assert raw.breakdown("a.test", "props." + key, Period()) == expected
    connection.close()
    store.close()


def set_schema_version(connection, config, version):
    if config.database_path.startswith("postgresql://"):
        connection.execute("DELETE FROM schema_version WHERE version > :v", {"v": version})
        connection.execute("INSERT INTO schema_version SELECT :v WHERE :v > (SELECT max(version) "
                           "FROM schema_version)", {"v": version})
    else:
        connection.execute(f"PRAGMA user_version = {version}")


def test_a_utm_tag_with_a_nul_character_is_left_out_and_its_batch_is_stored(client, config):
    """PostgreSQL text cannot hold NUL: the batch of such an event was retried forever."""
    event = {"n": "pageview", "d": "a.test", "u": "http://a.test/?utm_source=mail&utm_campaign=a%00b"}
    assert client.post("/api/event", json=event, headers={"User-Agent": CHROME}).status_code == 202
    assert client.post("/event", json={"site_id": "a.test", "event_type": "page_view"}).status_code == 200
    assert processor_for(config).step() == 2        # one batch, whose failure would be raised here
    store, connection, rollup, raw = reports_of(config)
    assert rollup.breakdown("a.test", "utm_source", Period()) == [
        {"value": "mail", "views": 1, "events": 1, "unique_users": 1}]
    assert rollup.breakdown("a.test", "utm_campaign", Period()) == []
    for prop in ("source", "utm_source", "utm_campaign"):
        assert rollup.breakdown("a.test", prop, Period()) == raw.breakdown("a.test", prop, Period())
    connection.close()
    store.close()


def test_a_user_agent_with_a_nul_character_is_stored_without_browser_os_or_device(client, config):
    """Flask's own server passes such a header on (gunicorn refuses it); PostgreSQL text cannot hold NUL."""
    event = {"n": "pageview", "d": "a.test", "u": "http://a.test/"}
    user_agent = "Ap\x00p/1.2 CFNetwork/1220.1 Darwin/20.3.0"        # ua-parser names the browser Ap\x00p
    assert client.post("/api/event", json=event, headers={"User-Agent": user_agent}).status_code == 202
    assert client.post("/event", json={"site_id": "a.test", "event_type": "page_view"}).status_code == 200
    assert processor_for(config).step() == 2        # one batch, whose failure would be raised here
    store, connection, rollup, raw = reports_of(config)
    assert rollup.stats("a.test", Period())["total_views"] == 2
    for prop in ("browser", "os", "device"):
        assert rollup.breakdown("a.test", prop, Period()) == raw.breakdown("a.test", prop, Period()) == []
    connection.close()
    store.close()
