"""Rollups: the aggregates every report reads, kept exact.

They are updated in the same transaction as the events they count, so they are
exactly-once too. Each batch is summed first (one upsert per distinct key, not
per event): in memory for SQLite (BatchTotals, add_totals), in SQL over the
batch's new rows for PostgreSQL (fold). Unique users are kept as sets of user
ids (tables keyed by what they count), so the number of distinct users over
any range of days is exact, never a sum of daily counts.

A day's users are one set, daily_users: a row per site, day and user, whose
hours column is a mask of the UTC hours of that day the user was seen in (bit
h for hour h), so an hour's users are the day's rows with its bit set. The
number of a day's users is also kept as a counter (daily_totals.users),
added to whenever a batch brings a user new to that day, so that a one-day
report reads one row instead of counting the day's users.

A breakdown property is one entry in PROPERTIES: its name and the SQL
expression over the events table that gives its value ('' shows as null;
events whose value is NULL are left out of that breakdown). Custom-event
props are properties too, named "props.<key>".

A user is the site's user_id or, for browser traffic without one, the
cookieless visitor id. Engagement events (time on page, scroll depth) are
kept in the events table but are not views, events or visits.
"""
import re
from dataclasses import dataclass
from collections import Counter
from functools import lru_cache
from itertools import compress

import orjson

from enrich import ENRICHED_COLUMNS
from events import EVENT_COLUMNS

PROPERTIES = {
    "path": "coalesce(path, '')",
    "event_type": "event_type",
    "source": "coalesce(source, '')",
    "referrer": "referrer",
    "utm_source": "utm_source",
    "utm_medium": "utm_medium",
    "utm_campaign": "utm_campaign",
    "browser": "browser",
    "os": "os",
    "device": "device",
}
PROP_PREFIX = "props."          # a custom-event prop's property name is this and its key
PROP_KEY = re.compile(r"[A-Za-z0-9_ .:-]{1,64}")
USER = "coalesce(user_id, visitor_id)"
COUNTED = "event_type != 'engagement'"


def is_property(name):
    return name in PROPERTIES or (name.startswith(PROP_PREFIX)
                                  and bool(PROP_KEY.fullmatch(name[len(PROP_PREFIX):])))


def property_expression(name, json_value="json_extract(props, '$.\"{key}\"')"):
    """The SQL value of a property over the events table; json_value reads one prop."""
    if name in PROPERTIES:
        return PROPERTIES[name]
    return json_value.format(key=name[len(PROP_PREFIX):])      # PROP_KEY admits no quote

# The schema is made by the stores' migrations (store.py, postgres_store.py).
TABLES = ("site_totals", "site_users", "hourly_totals", "daily_users", "daily_totals",
          "daily_values", "total_values", "daily_value_users")

VIEW = "count(*) FILTER (WHERE event_type = 'page_view')"
COUNT_TARGETS = {"site_totals": "site_id", "hourly_totals": "site_id, hour",
                 "daily_values": "site_id, property, day, value",
                 "total_values": "site_id, property, value"}


@dataclass(frozen=True)
class Dialect:
    """Where PostgreSQL's new rows are, and how its counters are keyed.

    new_events: FROM ... WHERE ... over the rows just inserted, aliased e.
    props_join: the same rows joined with their props as prop(key, value).
    shard: None, or this processor's shard number: counter rows are then kept
    per shard (and summed by reports), so that concurrent processors never
    wait on each other's counter rows.
    value_key: the SQL for value in the unique keys of the value tables
    (PostgreSQL's key a long value by its digest: see postgres_store.py).
    """
    new_events: str
    props_join: str
    shard: int = None
    value_key: str = "value"


def _counts(table, select, dialect):
    """Upsert counts: views and events added to what the row holds.

    Rows go in the order of their whole key (by value where the key is a
    function of it: still one total order), so that concurrent writers of
    one shard lock rows in the same order.
    """
    target = COUNT_TARGETS[table]
    order = ", ".join(str(number) for number in range(1, target.count(",") + 2))
    target = target.replace("value", dialect.value_key)
    if dialect.shard is not None:
        select = select.replace(" FROM ", f", {dialect.shard} FROM ", 1)   # the last column
        target += ", shard"
    return (f"INSERT INTO {table} {select} ORDER BY {order} ON CONFLICT ({target}) DO UPDATE SET "
            f"views = {table}.views + excluded.views, events = {table}.events + excluded.events")


def _value_statements(name_sql, value_sql, source, dialect):
    """Fold one property (or every prop of props) into the value tables."""
    day = "substr(e.timestamp, 1, 10)"
    return [
        _counts("daily_values", f"SELECT e.site_id, {name_sql}, {day}, {value_sql}, {VIEW}, count(*) "
                f"{source} GROUP BY 1, 2, 3, 4", dialect),
        _counts("total_values", f"SELECT e.site_id, {name_sql}, {value_sql}, {VIEW}, count(*) "
                f"{source} GROUP BY 1, 2, 3", dialect),
        f"INSERT INTO daily_value_users SELECT DISTINCT e.site_id, {name_sql}, {value_sql}, {day}, "
        f"{USER} {source} AND {USER} IS NOT NULL ORDER BY 1, 2, 3, 4, 5 ON CONFLICT DO NOTHING",
    ]


def _daily_users(dialect):
    """Add the batch's users to daily_users and count those new to their day into daily_totals.

    An existing row is written only when the batch saw its user in an hour it
    lacks; xmax = 0 marks the rows the INSERT really inserted.
    """
    shard, target = ("", "site_id, day") if dialect.shard is None else (f", {dialect.shard}",
                                                                        "site_id, day, shard")
    return (f"WITH seen AS (INSERT INTO daily_users SELECT site_id, substr(timestamp, 1, 10), {USER}, "
            "bit_or(1 << CAST(substr(timestamp, 12, 2) AS INTEGER)) "
            f"{dialect.new_events} AND {COUNTED} AND {USER} IS NOT NULL GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 "
            "ON CONFLICT (site_id, day, user_id) DO UPDATE SET hours = daily_users.hours | excluded.hours "
            "WHERE daily_users.hours | excluded.hours != daily_users.hours "
            "RETURNING site_id, day, xmax = 0 AS inserted) "
            f"INSERT INTO daily_totals SELECT site_id, day, count(*){shard} FROM seen WHERE inserted "
            f"GROUP BY 1, 2 ORDER BY 1, 2 ON CONFLICT ({target}) DO UPDATE SET "
            "users = daily_totals.users + excluded.users")


@lru_cache(maxsize=None)
def fold_statements(dialect):
    new = f"{dialect.new_events} AND {COUNTED}"
    statements = [
        _counts("hourly_totals", f"SELECT site_id, substr(timestamp, 1, 13), {VIEW}, count(*) "
                f"{new} GROUP BY 1, 2", dialect),
        _daily_users(dialect),
        _counts("site_totals", f"SELECT site_id, {VIEW}, count(*), 0 AS users {new} GROUP BY 1", dialect),
    ]
    for name, value in PROPERTIES.items():
        statements += _value_statements(f"'{name}'", value, f"{new} AND {value} IS NOT NULL", dialect)
    statements += _value_statements(f"'{PROP_PREFIX}' || prop.key", "prop.value",
                                    f"{dialect.props_join} AND {COUNTED}", dialect)
    return statements


def fold(connection, dialect, params):
    """Add the new rows (as the dialect finds them) to every rollup.

    Call inside the transaction that inserted them. connection.execute takes
    SQL with :name parameters.
    """
    for statement in fold_statements(dialect):
        connection.execute(statement, params)
    new = f"{dialect.new_events} AND {COUNTED}"
    new_users = {}
    for (site_id,) in connection.execute(
            f"INSERT INTO site_users SELECT DISTINCT site_id, {USER} {new} AND {USER} IS NOT NULL "
            f"ORDER BY 1, 2 ON CONFLICT DO NOTHING RETURNING site_id", params).fetchall():
        new_users[site_id] = new_users.get(site_id, 0) + 1
    shard = "" if dialect.shard is None else f" AND shard = {dialect.shard}"
    connection.executemany(f"UPDATE site_totals SET users = users + :count WHERE site_id = :site{shard}",
                           [{"count": count, "site": site} for site, count in new_users.items()])


# a stored row: the original columns, the event's unique id, what enrichment added
ROW_COLUMNS = EVENT_COLUMNS + ("event_id",) + ENRICHED_COLUMNS
SITE, KIND, PATH, USER_ID, TIMESTAMP, VISITOR, SOURCE, PROPS = (ROW_COLUMNS.index(name) for name in (
    "site_id", "event_type", "path", "user_id", "timestamp", "visitor_id", "source", "props"))
# the properties counted only where they have a value (path and source are always counted)
OPTIONAL_VALUES = tuple((name, ROW_COLUMNS.index(name)) for name in PROPERTIES
                        if name not in ("path", "event_type", "source"))


class BatchTotals:
    """A batch of stored rows summed in memory: one upsert per distinct key, not per event.

    The same figures fold() computes in SQL (the tests check both against the
    raw events). Counts map a key to [views, events]; user sets hold each key
    once. Built column by column so that the counting runs in C (Counter, zip).
    """

    def __init__(self, rows):
        counted = [row for row in rows if row[KIND] != "engagement"]
        sites = [row[SITE] for row in counted]
        days = [row[TIMESTAMP][:10] for row in counted]
        hours = [row[TIMESTAMP][:13] for row in counted]
        users = [row[USER_ID] if row[USER_ID] is not None else row[VISITOR] for row in counted]
        views = [row[KIND] == "page_view" for row in counted]
        self.hourly, self.sites, self.daily_values = {}, {}, {}
        _tally(self.hourly, zip(sites, hours, views))
        _tally(self.sites, zip(sites, views))
        self.daily_users = {}      # (site, day) -> {user: mask of the hours seen}
        for site, hour, user in set(_known(zip(sites, hours, users), users)):
            masks = self.daily_users.setdefault((site, hour[:10]), {})
            masks[user] = masks.get(user, 0) | 1 << int(hour[11:])
        self.site_users = {}
        for site, user in _known(zip(sites, users), users):
            self.site_users.setdefault(site, set()).add(user)
        self.value_users = set()
        self._add_values("path", [row[PATH] or "" for row in counted], sites, days, users, views)
        self._add_values("event_type", [row[KIND] for row in counted], sites, days, users, views)
        self._add_values("source", [row[SOURCE] or "" for row in counted], sites, days, users, views)
        for name, index in OPTIONAL_VALUES:
            values = [row[index] for row in counted]
            if values.count(None) < len(values):
                self._add_values(name, values, sites, days, users, views)
        self._add_props([row for row in counted if row[PROPS]])
        self.total_values = {}
        for (site, name, _, value), (viewed, events) in self.daily_values.items():
            _add(self.total_values, (site, name, value), viewed, events)

    def _add_values(self, name, values, sites, days, users, views, names=None):
        """One property's values (None: the event has none) into the value tables.

        names: the property's name per value, when they differ (props).
        """
        if None in values:
            present = [value is not None for value in values]
            values, sites, days, users, views = (list(compress(column, present))
                                                 for column in (values, sites, days, users, views))
        names = names or [name] * len(values)
        _tally(self.daily_values, zip(sites, names, days, values, views))
        self.value_users.update(_known(zip(sites, names, values, days, users), users))

    def _add_props(self, rows):
        pairs = [(row, PROP_PREFIX + key, value) for row in rows
                 for key, value in orjson.loads(row[PROPS]).items()]
        if pairs:
            names = [name for _, name, _ in pairs]
            self._add_values(None, [value for _, _, value in pairs], [row[SITE] for row, _, _ in pairs],
                             [row[TIMESTAMP][:10] for row, _, _ in pairs],
                             [row[USER_ID] if row[USER_ID] is not None else row[VISITOR]
                              for row, _, _ in pairs],
                             [row[KIND] == "page_view" for row, _, _ in pairs], names=names)


def _tally(counts, keys_with_view):
    """Add events to counts; each event is its key's columns followed by its view flag."""
    for key_and_view, events in Counter(keys_with_view).items():
        _add(counts, key_and_view[:-1], events if key_and_view[-1] else 0, events)


def _add(counts, key, views, events):
    pair = counts.get(key)
    if pair is None:
        counts[key] = [views, events]
    else:
        pair[0] += views
        pair[1] += events


def _known(keys, users):
    """The keys of events that have a user."""
    return compress(keys, [user is not None for user in users])


def _upsert(table, target, columns):
    return (f"INSERT INTO {table} VALUES ({', '.join('?' * columns)}) ON CONFLICT ({target}) "
            f"DO UPDATE SET views = {table}.views + excluded.views, events = {table}.events + excluded.events")


def add_totals(connection, totals):
    """Add a BatchTotals to SQLite's rollups (a sqlite3 connection, ? parameters).

    Unsorted: SQLite has one writer, so no lock order to keep, and sorting
    tuples in Python costs more than the B-tree saves.
    """
    connection.executemany(_upsert("hourly_totals", COUNT_TARGETS["hourly_totals"], 4),
                           [key + tuple(pair) for key, pair in totals.hourly.items()])
    connection.executemany(_upsert("daily_values", COUNT_TARGETS["daily_values"], 6),
                           [key + tuple(pair) for key, pair in totals.daily_values.items()])
    connection.executemany(_upsert("total_values", COUNT_TARGETS["total_values"], 5),
                           [key + tuple(pair) for key, pair in totals.total_values.items()])
    # new rows are counted into daily_totals by the trigger daily_users_counted (store.py)
    connection.executemany("INSERT INTO daily_users VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE "
                           "SET hours = hours | excluded.hours WHERE hours | excluded.hours != hours",
                           [(site, day, user, hours) for (site, day), masks in totals.daily_users.items()
                            for user, hours in masks.items()])
    connection.executemany("INSERT INTO daily_value_users VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                           totals.value_users)
    for (site,), (views, events) in totals.sites.items():
        users = totals.site_users.get(site, ())
        new_users = connection.executemany(
            "INSERT INTO site_users VALUES (?, ?) ON CONFLICT DO NOTHING",
            [(site, user) for user in users]).rowcount if users else 0
        connection.execute(
            "INSERT INTO site_totals VALUES (?, ?, ?, ?) ON CONFLICT (site_id) DO UPDATE SET "
            "views = views + excluded.views, events = events + excluded.events, "
            "users = users + excluded.users", (site, views, events, new_users))


def clear(connection):
    for table in TABLES:
        connection.execute(f"DELETE FROM {table}")
