"""Reports from rollups answer exactly what plain SQL over raw events answers."""
import random
import sqlite3
from datetime import date, timedelta

import pytest

from events import encode_event, validate_event
from reports import Period, RawReports, RollupReports
from rollups import PROPERTIES
from shared_queue import open_queue
from store import MIGRATIONS, SQLiteStore, open_store
from test_backends import CHROME, IPHONE

FIRST_DAY = date(2025, 3, 1)
DAYS = 6
RANKED_INDEX = next(number for number, migration in enumerate(MIGRATIONS)
                    if "CREATE INDEX daily_values_ranked" in migration)


def generated_events(count, seed=7):
    rng = random.Random(seed)
    for _ in range(count):
        day = FIRST_DAY + timedelta(days=rng.randrange(DAYS))
        yield {"site_id": rng.choice(["big", "big", "big", "small", "tiny"]),
               "event_type": rng.choice(["page_view"] * 6 + ["click", "signup"]),
               "path": rng.choice([None, "/", "/a", "/b", "/c", "/d/e", ""]),
               "user_id": rng.choice([None] + [f"u{n}" for n in range(40)]),
               "timestamp": f"{day.isoformat()}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:00Z"}


def with_browser_fields(events, seed=8):
    """The events as queued with what a browser's event also has, a User-Agent, a referrer and the
    page's query, from which the processor works out source, referrer, UTM tags, browser, OS and
    device; a third of them have no User-Agent, as events of our own API."""
    rng = random.Random(seed)
    for event in events:
        yield {**validate_event(event), "ua": rng.choice([None, CHROME, IPHONE]),
               "referrer": rng.choice([None, "https://news.test/x", "https://other.test/"]),
               "query": rng.choice([None, "utm_source=mail&utm_medium=email&utm_campaign=spring",
                                    "utm_source=ads&utm_medium=cpc&utm_campaign=autumn"])}


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    from config import load_config
    from processor import Processor
    config = load_config(environ={}, data_dir=str(tmp_path_factory.mktemp("reports")),
                         processor_batch_size=97)      # many batches, so folds add up
    open_queue(config).append([encode_event(event) for event in with_browser_fields(generated_events(3000))])
    processor = Processor(open_queue(config), open_store(config), config)
    processor.start()
    processor.run(once=True)
    return config.database_path


@pytest.fixture(scope="module")
def both(database):
    connection = sqlite3.connect(database)
    return RollupReports(connection), RawReports(connection)


PERIODS = [Period(), Period(FIRST_DAY, FIRST_DAY), Period(FIRST_DAY, FIRST_DAY + timedelta(days=2)),
           Period(FIRST_DAY + timedelta(days=4), FIRST_DAY + timedelta(days=9)),
           Period(date(2024, 1, 1), date(2024, 1, 3)), Period(date.max, date.max)]
SITES = ["big", "small", "tiny", "absent"]


@pytest.mark.parametrize("period", PERIODS, ids=str)
@pytest.mark.parametrize("site", SITES)
def test_stats_from_rollups_equal_stats_from_raw_events(both, site, period):
    rollup, raw = both
    assert rollup.stats(site, period, limit=3) == raw.stats(site, period, limit=3)
    assert rollup.stats(site, period, limit=1000) == raw.stats(site, period, limit=1000)


@pytest.mark.parametrize("period", [p for p in PERIODS if not p.all_time], ids=str)
@pytest.mark.parametrize("interval", ["day", "hour"])
@pytest.mark.parametrize("site", SITES)
def test_timeseries_from_rollups_equal_raw(both, site, interval, period):
    rollup, raw = both
    assert rollup.timeseries(site, period, interval) == raw.timeseries(site, period, interval)


@pytest.mark.parametrize("period", PERIODS, ids=str)
@pytest.mark.parametrize("prop", list(PROPERTIES))
@pytest.mark.parametrize("site", SITES)
def test_breakdown_from_rollups_equal_raw(both, site, prop, period):
    rollup, raw = both
    assert rollup.breakdown(site, prop, period, 2) == raw.breakdown(site, prop, period, 2)
    assert rollup.breakdown(site, prop, period, 50) == raw.breakdown(site, prop, period, 50)


@pytest.mark.parametrize("prop", list(PROPERTIES))
def test_every_property_has_values_for_the_comparisons_above_to_compare(both, prop):
    _, raw = both
    assert len(raw.breakdown("tiny", prop, Period(FIRST_DAY, FIRST_DAY), 50)) >= 2


def test_sites_from_rollups_equal_raw(both):
    rollup, raw = both
    assert [site["site_id"] for site in rollup.sites()] == ["big", "small", "tiny"]
    assert rollup.sites() == raw.sites()


def test_unique_users_over_a_range_are_distinct_not_summed(database):
    connection = sqlite3.connect(database)
    period = Period(FIRST_DAY, FIRST_DAY + timedelta(days=DAYS - 1))
    total = RollupReports(connection).stats("big", period)["unique_users"]
    daily_sum = sum(RollupReports(connection).stats("big", Period(day, day))["unique_users"]
                    for day in (FIRST_DAY + timedelta(days=n) for n in range(DAYS)))
    distinct = connection.execute("SELECT count(DISTINCT user_id) FROM events "
                                  "WHERE site_id = 'big'").fetchone()[0]
    assert total == distinct == 40
    assert daily_sum > total


def test_timeseries_has_every_bucket_with_zeros(both):
    rollup, _ = both
    period = Period(date(2024, 1, 1), date(2024, 1, 2))
    points = rollup.timeseries("big", period, "hour")
    assert len(points) == 48
    assert points[0] == {"date": "2024-01-01T00:00:00Z", "views": 0, "unique_users": 0}
    assert rollup.timeseries("big", period, "day") == [
        {"date": "2024-01-01", "views": 0, "unique_users": 0},
        {"date": "2024-01-02", "views": 0, "unique_users": 0}]


def test_rebuild_recomputes_the_same_rollups(database, both):
    rollup, _ = both
    before = [rollup.stats("big", p) for p in PERIODS] + [rollup.breakdown("big", "path", p)
                                                          for p in PERIODS]
    connection = sqlite3.connect(database)
    connection.execute("UPDATE site_totals SET views = 0")
    connection.execute("DELETE FROM daily_values")
    connection.commit()
    progress = []
    SQLiteStore(database).rebuild_rollups(lambda done, total: progress.append((done, total)))
    after = [rollup.stats("big", p) for p in PERIODS] + [rollup.breakdown("big", "path", p)
                                                         for p in PERIODS]
    assert after == before
    assert progress[-1][0] == progress[-1][1] == 3000


def test_an_upgrade_keeps_the_all_time_totals_of_events_retention_deleted(database, tmp_path):
    """All-time totals count every event ever stored (README): an upgrade must not count them
    afresh from the events retention left."""
    path = str(tmp_path / "analytics.db")
    copy = sqlite3.connect(path, isolation_level=None)
    sqlite3.connect(database).backup(copy)
    before = RollupReports(copy).stats("big", Period())
    copy.execute("DELETE FROM events WHERE timestamp < ?", (str(FIRST_DAY + timedelta(days=3)),))
    copy.execute("DROP INDEX daily_values_ranked")      # back to the version before that index
    copy.execute(f"PRAGMA user_version = {RANKED_INDEX}")
    copy.close()
    SQLiteStore(path).migrate()
    assert RollupReports(sqlite3.connect(path)).stats("big", Period()) == before


def test_migration_upgrades_a_version_one_database_in_place(tmp_path):
    path = str(tmp_path / "analytics.db")
    connection = sqlite3.connect(path)
    connection.executescript(MIGRATIONS[0])
    connection.execute("PRAGMA user_version = 1")
    rows = [(e["site_id"], e["event_type"], e["path"] or None, e["user_id"],
             validate_event(e)["timestamp"]) for e in generated_events(500, seed=3)]
    connection.executemany("INSERT INTO events (site_id, event_type, path, user_id, timestamp) "
                           "VALUES (?, ?, ?, ?, ?)", rows)
    connection.commit()
    store = SQLiteStore(path)
    assert store.migrate() == len(MIGRATIONS)
    for site in SITES:
        for period in PERIODS:
            assert (RollupReports(store.connection).stats(site, period)
                    == RawReports(store.connection).stats(site, period))


# the rollups a version-two processor kept: counts per hour, sets of users per hour, and the
# path and event type of each event per day and all time (version three added sources)
VERSION_TWO_FOLD = """
INSERT INTO hourly_totals SELECT site_id, substr(timestamp, 1, 13), sum(event_type = 'page_view'),
    count(*) FROM events GROUP BY 1, 2;
INSERT INTO hourly_users SELECT DISTINCT site_id, substr(timestamp, 1, 13), user_id FROM events
    WHERE user_id IS NOT NULL;
INSERT INTO site_totals SELECT site_id, sum(event_type = 'page_view'), count(*),
    count(DISTINCT user_id) FROM events GROUP BY 1;
INSERT INTO site_users SELECT DISTINCT site_id, user_id FROM events WHERE user_id IS NOT NULL;
INSERT INTO daily_values SELECT site_id, property, substr(timestamp, 1, 10), value,
    sum(event_type = 'page_view'), count(*) FROM version_two_values GROUP BY 1, 2, 3, 4;
INSERT INTO total_values SELECT site_id, property, value, sum(event_type = 'page_view'), count(*)
    FROM version_two_values GROUP BY 1, 2, 3;
INSERT INTO daily_value_users SELECT DISTINCT site_id, property, value, substr(timestamp, 1, 10),
    user_id FROM version_two_values WHERE user_id IS NOT NULL;
"""


def test_migration_from_version_two_counts_the_stored_events_by_source(tmp_path):
    path = str(tmp_path / "analytics.db")
    connection = sqlite3.connect(path)
    for migration in MIGRATIONS[:2]:
        connection.executescript(migration)
    connection.execute("PRAGMA user_version = 2")
    rows = [(e["site_id"], e["event_type"], e["path"] or None, e["user_id"],
             validate_event(e)["timestamp"]) for e in generated_events(500, seed=5)]
    connection.executemany("INSERT INTO events (site_id, event_type, path, user_id, timestamp) "
                           "VALUES (?, ?, ?, ?, ?)", rows)
    connection.execute("CREATE TEMP VIEW version_two_values AS "
                       "SELECT *, 'path' AS property, coalesce(path, '') AS value FROM events UNION ALL "
                       "SELECT *, 'event_type', event_type FROM events")
    connection.executescript(VERSION_TWO_FOLD)
    connection.close()
    store = SQLiteStore(path)
    assert store.migrate() == len(MIGRATIONS)
    assert store.count_events() == 500
    for site in SITES:
        for period in PERIODS:
            for prop in ("source", "path", "event_type"):
                assert (RollupReports(store.connection).breakdown(site, prop, period, 50)
                        == RawReports(store.connection).breakdown(site, prop, period, 50))
            assert (RollupReports(store.connection).stats(site, period)
                    == RawReports(store.connection).stats(site, period))


def drained(config, events):
    from processor import Processor
    open_queue(config).append([encode_event(validate_event(event)) for event in events])
    processor = Processor(open_queue(config), open_store(config), config)
    processor.start()
    processor.run(once=True)
    processor.store.close()


def renamed_users(events, prefix):
    return ({**event, "user_id": event["user_id"] and prefix + event["user_id"]} for event in events)


@pytest.mark.parametrize("upgraded", [False, True], ids=["version-five-as-released", "already-upgraded"])
def test_a_version_five_database_without_its_trigger_counts_each_days_new_users(tmp_path, upgraded):
    """Version five as first released counted a day's new users in the processor, with no
    trigger: once upgraded, its database must count them as a new one does, and the days that
    version six stored into it without the trigger must be counted again."""
    from config import load_config
    config = load_config(environ={}, data_dir=str(tmp_path), processor_batch_size=97)
    drained(config, generated_events(400, seed=1))
    connection = sqlite3.connect(config.database_path, isolation_level=None)
    connection.execute("DROP TRIGGER daily_users_counted")
    if upgraded:    # version six took such a database for current: its days' new users went uncounted
        drained(config, renamed_users(generated_events(400, seed=2), "later-"))
        connection.execute(f"PRAGMA user_version = {RANKED_INDEX + 1}")
    else:
        connection.execute("DROP INDEX daily_values_ranked")
        connection.execute(f"PRAGMA user_version = {RANKED_INDEX}")
    connection.close()
    drained(config, renamed_users(generated_events(400, seed=3), "new-"))
    connection = sqlite3.connect(config.database_path)
    for site in SITES:
        for day in range(DAYS):
            period = Period(FIRST_DAY + timedelta(days=day), FIRST_DAY + timedelta(days=day))
            assert RollupReports(connection).stats(site, period) == RawReports(connection).stats(site, period)
