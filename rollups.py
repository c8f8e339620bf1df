"""Rollups: the aggregates every report reads, kept exact.

They are folded in the same transaction as the events they count, so they are
exactly-once too. Counts are summed per batch inside the database (one upsert
per distinct key, not per event); unique users are kept as sets of user ids
(tables keyed by what they count), so the number of distinct users over any
range of days is exact, never a sum of daily counts.

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
from functools import lru_cache

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
PROP_KEY = re.compile(r"[A-Za-z0-9_ .:-]{1,64}")
USER = "coalesce(user_id, visitor_id)"
COUNTED = "event_type != 'engagement'"


def is_property(name):
    return name in PROPERTIES or (name.startswith("props.") and bool(PROP_KEY.fullmatch(name[6:])))


def property_expression(name, json_value="json_extract(props, '$.\"{key}\"')"):
    """The SQL value of a property over the events table; json_value reads one prop."""
    if name in PROPERTIES:
        return PROPERTIES[name]
    return json_value.format(key=name[6:])      # PROP_KEY admits no quote

SCHEMA = """
CREATE TABLE IF NOT EXISTS site_totals (
    site_id TEXT PRIMARY KEY, views INTEGER NOT NULL, events INTEGER NOT NULL,
    users INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS site_users (
    site_id TEXT NOT NULL, user_id TEXT NOT NULL, PRIMARY KEY (site_id, user_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hourly_totals (
    site_id TEXT NOT NULL, hour TEXT NOT NULL, views INTEGER NOT NULL, events INTEGER NOT NULL,
    PRIMARY KEY (site_id, hour)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hourly_users (
    site_id TEXT NOT NULL, hour TEXT NOT NULL, user_id TEXT NOT NULL,
    PRIMARY KEY (site_id, hour, user_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS daily_values (
    site_id TEXT NOT NULL, property TEXT NOT NULL, day TEXT NOT NULL, value TEXT NOT NULL,
    views INTEGER NOT NULL, events INTEGER NOT NULL,
    PRIMARY KEY (site_id, property, day, value)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS total_values (
    site_id TEXT NOT NULL, property TEXT NOT NULL, value TEXT NOT NULL,
    views INTEGER NOT NULL, events INTEGER NOT NULL,
    PRIMARY KEY (site_id, property, value)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS daily_value_users (
    site_id TEXT NOT NULL, property TEXT NOT NULL, value TEXT NOT NULL, day TEXT NOT NULL,
    user_id TEXT NOT NULL,
    PRIMARY KEY (site_id, property, value, day, user_id)
) WITHOUT ROWID
"""

TABLES = ("site_totals", "site_users", "hourly_totals", "hourly_users",
          "daily_values", "total_values", "daily_value_users")

VIEW = "count(*) FILTER (WHERE event_type = 'page_view')"
COUNT_TARGETS = {"site_totals": "site_id", "hourly_totals": "site_id, hour",
                 "daily_values": "site_id, property, day, value",
                 "total_values": "site_id, property, value"}


@dataclass(frozen=True)
class Dialect:
    """Where a store's new rows are, and how its counters are keyed.

    new_events: FROM ... WHERE ... over the rows just inserted, aliased e.
    props_join: the same rows joined with their props as prop(key, value).
    shard: None, or this processor's shard number: counter rows are then kept
    per shard (and summed by reports), so that concurrent processors never
    wait on each other's counter rows.
    """
    new_events: str
    props_join: str
    shard: int = None


SQLITE = Dialect(
    new_events="FROM events AS e WHERE e.id > :low AND e.id <= :high",
    # json_each has id and path columns of its own, hence the e. prefixes
    props_join="FROM events AS e, json_each(e.props) AS prop "
               "WHERE e.id > :low AND e.id <= :high AND e.props IS NOT NULL")


def _counts(table, select, dialect, order="1, 2"):
    """Upsert counts: views and events added to what the row holds.

    Rows go in key order, so concurrent writers lock rows in the same order.
    """
    target = COUNT_TARGETS[table]
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


@lru_cache(maxsize=None)
def fold_statements(dialect):
    new = f"{dialect.new_events} AND {COUNTED}"
    statements = [
        _counts("hourly_totals", f"SELECT site_id, substr(timestamp, 1, 13), {VIEW}, count(*) "
                f"{new} GROUP BY 1, 2", dialect),
        f"INSERT INTO hourly_users SELECT DISTINCT site_id, substr(timestamp, 1, 13), {USER} "
        f"{new} AND {USER} IS NOT NULL ORDER BY 1, 2, 3 ON CONFLICT DO NOTHING",
        _counts("site_totals", f"SELECT site_id, {VIEW}, count(*), 0 AS users {new} GROUP BY 1",
                dialect, order="1"),
    ]
    for name, value in PROPERTIES.items():
        statements += _value_statements(f"'{name}'", value, f"{new} AND {value} IS NOT NULL", dialect)
    statements += _value_statements("'props.' || prop.key", "prop.value",
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


def clear(connection):
    for table in TABLES:
        connection.execute(f"DELETE FROM {table}")
