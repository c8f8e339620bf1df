"""Retention deletes old events and rollup rows in small batches, on every store."""
import itertools
import os
import logging
import re
import sqlite3
import threading
from contextlib import closing
from datetime import date, datetime, timedelta, timezone

import pytest

from config import ConfigurationError, load_config
from events import encode_event, validate_event
from ingestion_api import create_app
from processor import Processor
from rate_limit import SECRET_NAME
from reports import Period
from retention import ROLLUP_TABLES, Retention, utc_today
from shared_queue import open_queue
from store import StoreUnavailable, open_store
from tracking import Visitors

ALL_BACKENDS = True
TODAY = date(2025, 3, 10)
DAYS_BACK = 6           # events on TODAY and each of the 5 days before it


def events_per_day(days_back=DAYS_BACK, per_day=20, today=TODAY):
    """Page views and clicks on several days, paths and users, in arrival order mixed up."""
    lines = []
    for n in range(per_day):
        for back in range(days_back):
            day = today - timedelta(days=back)
            lines.append(encode_event(validate_event({
                "site_id": "s", "event_type": "page_view" if n % 4 else "click",
                "path": f"/p{n % 3}", "user_id": f"u{(n + back) % 7}",
                "timestamp": f"{day.isoformat()}T{n % 24:02d}:30:00Z"})))
    return lines


@pytest.fixture
def store(config):
    open_queue(config).append(events_per_day())
    processor = Processor(open_queue(config), open_store(config), config)
    processor.start()
    processor.run(once=True)
    store = open_store(config)
    yield store
    store.close()


def run_pass(store, config, **settings):
    """Run one whole retention pass with the given settings; returns rows deleted per window."""
    retention = Retention(store, config.with_overrides(**settings), today=lambda: TODAY,
                          clock=itertools.count().__next__)        # every step is due
    windows = [retention.step()]
    while retention.in_pass:
        windows.append(retention.step())
    return windows


def query(store, sql):
    connection = store.connect(readonly=True)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def event_days(store):
    return [row[0] for row in query(
        store, "SELECT DISTINCT substr(timestamp, 1, 10) FROM events ORDER BY 1")]


def rollup_days(store, table):
    column = "hour" if table.startswith("hourly") else "day"
    return [row[0] for row in query(
        store, f"SELECT DISTINCT substr({column}, 1, 10) FROM {table} ORDER BY 1")]


def reports(store):
    connection = store.connect(readonly=True)
    return connection, store.reports(connection), store.reports(connection, raw=True)


def days(first, last):
    return [(TODAY - timedelta(days=back)).isoformat() for back in range(first, last - 1, -1)]


def test_events_older_than_retention_days_are_deleted_and_recent_ones_kept(config, store):
    run_pass(store, config, retention_days=2)
    assert event_days(store) == days(2, 0)
    assert query(store, "SELECT count(*) FROM events")[0][0] == 3 * 20


def test_event_retention_leaves_rollups_and_all_time_totals_alone(config, store):
    connection, rollup, _ = reports(store)
    before = rollup.stats("s", Period()), rollup.breakdown("s", "path", Period())
    connection.close()
    run_pass(store, config, retention_days=2)
    for table in ROLLUP_TABLES:
        assert rollup_days(store, table) == days(DAYS_BACK - 1, 0)
    connection, rollup, raw = reports(store)
    assert (rollup.stats("s", Period()), rollup.breakdown("s", "path", Period())) == before
    assert raw.stats("s", Period())["total_views"] < before[0]["total_views"]
    connection.close()


def test_rollup_retention_is_independent_of_event_retention(config, store):
    run_pass(store, config, rollup_retention_days=1)
    for table in ROLLUP_TABLES:
        assert rollup_days(store, table) == days(1, 0), table
    assert event_days(store) == days(DAYS_BACK - 1, 0)


def test_reports_over_the_kept_days_equal_raw_events_and_all_time_keeps_counting_deleted_ones(
        config, store):
    connection, rollup, _ = reports(store)
    all_time_before = rollup.stats("s", Period(), 100)
    connection.close()
    run_pass(store, config, retention_days=3, rollup_retention_days=3)
    connection, rollup, raw = reports(store)
    kept = Period(TODAY - timedelta(days=3), TODAY)
    assert rollup.stats("s", kept, 100) == raw.stats("s", kept, 100)
    assert rollup.stats("s", kept)["total_views"] > 0
    for interval in ("day", "hour"):
        assert rollup.timeseries("s", kept, interval) == raw.timeseries("s", kept, interval)
    for prop in ("path", "event_type"):
        assert rollup.breakdown("s", prop, kept) == raw.breakdown("s", prop, kept)
    expired = Period(TODAY - timedelta(days=5), TODAY - timedelta(days=4))
    assert rollup.stats("s", expired) == raw.stats("s", expired) == {
        "total_views": 0, "unique_users": 0, "top_paths": []}
    assert rollup.stats("s", Period(), 100) == all_time_before
    connection.close()


def report_answers(client, site_id, start, end):
    """What a dashboard asks of one period (totals, series by day and hour, paths), and paths of all time."""
    params = {"site_id": site_id, "from": start.isoformat(), "to": end.isoformat()}
    return [client.get(url, query_string={**params, **extra}).get_json() for url, extra in (
        ("/stats", {"limit": 100}), ("/stats/timeseries", {"interval": "day"}),
        ("/stats/timeseries", {"interval": "hour", "from": params["to"]}),
        ("/stats/breakdown", {"property": "path", "limit": 100}),
        ("/stats/breakdown", {"property": "path", "limit": 100, "from": None, "to": None}))]


def test_no_report_mixes_rollup_rows_a_pass_deleted_with_rows_it_has_yet_to_delete(config):
    today = utc_today()
    open_queue(config).append(events_per_day(per_day=30, today=today) + [encode_event(validate_event({
        "site_id": "s", "event_type": "page_view", "path": "/p0", "user_id": f"only {back} days ago",
        "timestamp": f"{(today - timedelta(days=back)).isoformat()}T12:00:00Z"})) for back in range(DAYS_BACK)])
    processor = Processor(open_queue(config), open_store(config), config)
    processor.start()
    processor.run(once=True)
    settings = config.with_overrides(rollup_retention_days=2, retention_batch_size=7)
    app = create_app(settings)
    client = app.test_client()
    store = open_store(settings)
    retention = Retention(store, settings, clock=itertools.count().__next__)    # every step is due
    start = today - timedelta(days=DAYS_BACK - 1)
    during = []
    retention.step()
    while retention.in_pass:
        during.append(report_answers(client, "s", start, today))
        retention.step()
    after = report_answers(client, "s", start, today)
    assert after[0] == {**report_answers(client, "s", today - timedelta(days=2), today)[0], "date": None}
    assert len(during) > 10 and all(answers == after for answers in during)
    store.close()
    app.extensions["analytics"]["store"].close()
    app.extensions["analytics"]["queue"].close()


def test_deletion_goes_in_windows_of_at_most_the_batch_size(config, store):
    windows = run_pass(store, config, retention_days=1, retention_batch_size=25)
    # 120 events, 25 per window: 5 windows, with 80 old ones among them
    assert len(windows) == 5 and sum(windows) == 4 * 20
    assert all(0 < deleted <= 25 for deleted in windows[:3])


def test_the_store_deletes_one_window_per_call_and_says_where_the_next_starts(config, store):
    deleted, after = store.delete_before("events", TODAY.isoformat(), None, 50)
    assert after is not None and 0 < deleted <= 50
    calls = 1
    while after is not None:
        more, after = store.delete_before("events", TODAY.isoformat(), after, 50)
        deleted += more
        calls += 1
    assert calls == 3 and deleted == 5 * 20
    assert event_days(store) == [TODAY.isoformat()]


def test_retention_deletes_at_most_one_window_per_interval(config, store):
    now = [0.0]
    retention = Retention(store, config.with_overrides(retention_days=1, retention_batch_size=10,
                                                       retention_interval=5.0),
                          today=lambda: TODAY, clock=lambda: now[0])
    assert retention.step() > 0
    left = query(store, "SELECT count(*) FROM events")
    now[0] = 4.9
    assert retention.step() == 0 and query(store, "SELECT count(*) FROM events") == left
    now[0] = 5.0
    assert retention.step() > 0


def test_a_finished_pass_runs_again_only_when_the_date_moves_the_cutoff(config, store):
    today = [TODAY - timedelta(days=1)]
    retention = Retention(store, config.with_overrides(retention_days=2),
                          today=lambda: today[0], clock=itertools.count().__next__)
    while retention.step() or retention.in_pass:
        pass
    assert event_days(store) == days(3, 0)
    assert retention.step() == 0 and not retention.in_pass
    today[0] = TODAY
    assert retention.step() == 20
    assert event_days(store) == days(2, 0)


def test_retention_logs_what_it_deleted(config, store, caplog):
    with caplog.at_level(logging.INFO, logger="retention"):
        run_pass(store, config, retention_days=2)
    messages = [record.getMessage() for record in caplog.records]
    assert f"retention deleted table=events rows=60 before={days(2, 2)[0]}" in messages
    assert f"retention finished table=events deleted=60 before={days(2, 2)[0]}" in messages


@pytest.mark.embedded
def test_the_processor_deletes_old_events_between_its_batches(config):
    today = utc_today()
    old, recent = today - timedelta(days=30), today - timedelta(days=1)
    open_queue(config).append([encode_event(validate_event({
        "site_id": "s", "event_type": "page_view", "timestamp": f"{day.isoformat()}T12:00:00Z"}))
        for day in (old, recent, old, recent)])
    settings = config.with_overrides(retention_days=7, retention_interval=0.001)
    processor = Processor(open_queue(settings), open_store(settings), settings)
    processor.start()
    processor.run(once=True)
    store = open_store(config)
    assert event_days(store) == [recent.isoformat()]
    store.close()


def test_once_finishes_the_retention_pass_on_every_table_before_exiting(config, caplog):
    today = utc_today()
    old, recent = today - timedelta(days=30), today - timedelta(days=1)
    open_queue(config).append([encode_event(validate_event({
        "site_id": "s", "event_type": "page_view", "user_id": f"u{n}",
        "timestamp": f"{day.isoformat()}T12:00:00Z"})) for n in range(20) for day in (old, recent)])
    settings = config.with_overrides(retention_days=7, rollup_retention_days=7, retention_batch_size=3,
                                     retention_interval=0.001)
    processor = Processor(open_queue(settings), open_store(settings), settings)
    processor.start()
    with caplog.at_level(logging.INFO, logger="retention"):
        processor.run(once=True)
    store = open_store(config)
    assert event_days(store) == [recent.isoformat()]
    for table in ROLLUP_TABLES:
        assert rollup_days(store, table) == [recent.isoformat()], table
    store.close()
    for table in ("events",) + ROLLUP_TABLES:
        assert f"retention finished table={table} " in caplog.text


def test_a_pass_run_to_its_end_logs_where_it_is_every_few_seconds(config, store, caplog):
    retention = Retention(store, config.with_overrides(retention_days=1, retention_batch_size=10),
                          today=lambda: TODAY, clock=itertools.count(step=10).__next__)   # 10 s a window
    retention.step()
    with caplog.at_level(logging.INFO, logger="retention"):
        retention.finish_pass(threading.Event())
    assert event_days(store) == days(1, 0)
    assert re.search(r"retention progress table=events deleted=\d+ tables_left=1", caplog.text)


@pytest.mark.embedded
@pytest.mark.parametrize("name, value", [("RETENTION_DAYS", "-1"), ("ROLLUP_RETENTION_DAYS", "a week"),
                                         ("RETENTION_BATCH_SIZE", "0"), ("LOG_FORMAT", "xml")])
def test_bad_retention_and_log_settings_stop_the_program(config, name, value):
    with pytest.raises(ConfigurationError, match=name):
        load_config(environ={name: value})


def test_a_failed_retention_batch_is_logged_and_retried_later_not_skipped(config, store, caplog):
    now = [0.0]
    retention = Retention(store, config.with_overrides(retention_days=1, retention_interval=1.0),
                          today=lambda: TODAY, clock=lambda: now[0])
    real_delete = store.delete_before

    def failing_delete(*args):
        raise StoreUnavailable("database went away")
    store.delete_before = failing_delete
    with caplog.at_level(logging.WARNING, logger="retention"):
        assert retention.step() == 0
    assert "retention batch failed table=events" in caplog.text
    store.delete_before = real_delete
    now[0] = 0.5
    assert retention.step() == 0                   # backing off
    now[0] = 1.0
    assert retention.step() == 4 * 20


@pytest.mark.embedded      # the store's calls are replaced: one backend is enough
@pytest.mark.parametrize("failing", ["forget_salts", "delete_before"])
def test_a_database_outage_is_logged_in_one_line_without_a_traceback(config, store, caplog, failing):
    retention = Retention(store, config.with_overrides(retention_days=1, retention_interval=1.0),
                          today=lambda: TODAY, clock=lambda: 0.0)

    def outage(*args):
        raise StoreUnavailable("PostgreSQL: connection failed: Connection refused")
    setattr(store, failing, outage)
    with caplog.at_level(logging.WARNING, logger="retention"):
        assert retention.step() == 0
    [record] = caplog.records
    assert record.levelname == "WARNING" and record.exc_info is None
    assert record.getMessage().endswith("; retrying in 1.0s: PostgreSQL: connection failed: Connection refused")


def test_a_batch_that_keeps_failing_is_retried_ever_less_often_up_to_five_minutes(config, store):
    now, tries = [0.0], []
    retention = Retention(store, config.with_overrides(retention_days=1, retention_interval=1.0),
                          today=lambda: TODAY, clock=lambda: now[0])

    def failing_delete(*args):
        tries.append(now[0])
        raise StoreUnavailable("database went away")
    store.delete_before = failing_delete
    while now[0] < 1000:
        retention.step()
        now[0] += 0.5
    # waits of 1, 2, 4, ... seconds after each failure, never more than MAX_BACKOFF (300)
    assert tries == [0.0, 1.0, 3.0, 7.0, 15.0, 31.0, 63.0, 127.0, 255.0, 511.0, 811.0]


def test_visitor_salts_over_48_hours_old_are_deleted_after_a_day_without_traffic(config, store):
    visitors = Visitors(store)
    for back in (3, 2):         # the last requests came two days ago
        moment = datetime.combine(TODAY - timedelta(days=back), datetime.min.time(), timezone.utc)
        visitors.visitor_id("s", "192.0.2.1", "Mozilla/5.0", moment)
    store.daily_salt(SECRET_NAME, b"k" * 32, forget_before="")
    run_pass(store, config)     # no retention settings: the salts go all the same
    assert query(store, "SELECT day FROM salts ORDER BY day") == [(SECRET_NAME,)]


@pytest.mark.embedded
def test_a_deleted_salt_leaves_no_copy_in_the_sqlite_file(config, store):
    """SQLite keeps a deleted row's bytes in the page's free space unless told to overwrite them."""
    old, today = os.urandom(32), os.urandom(32)
    store.daily_salt("2025-01-01", old, forget_before="")
    store.daily_salt("2025-01-03", today, forget_before="2025-01-02")      # the API's deletion
    store.daily_salt("2025-01-02", old[::-1], forget_before="")
    store.forget_salts("2025-01-03")                                      # the processor's
    with closing(sqlite3.connect(config.database_path)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = open(config.database_path, "rb").read()
    assert today in data and old not in data and old[::-1] not in data
