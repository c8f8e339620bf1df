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


def property_expression(name):
    """The SQL value of a property over the events table."""
    if name in PROPERTIES:
        return PROPERTIES[name]
    return f"json_extract(props, '$.\"{name[6:]}\"')"     # PROP_KEY admits no quote

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

VIEW = "(event_type = 'page_view')"
NEW_EVENTS = f"FROM events AS e WHERE e.id > :low AND e.id <= :high AND {COUNTED}"
ADD_COUNTS = "ON CONFLICT DO UPDATE SET views = views + excluded.views, events = events + excluded.events"


def _value_statements(name_sql, value_sql, source):
    """Fold one property (or every prop of props) into the value tables."""
    day = "substr(e.timestamp, 1, 10)"
    return [
        f"INSERT INTO daily_values SELECT e.site_id, {name_sql}, {day}, {value_sql}, "
        f"sum({VIEW}), count(*) {source} GROUP BY 1, 2, 3, 4 {ADD_COUNTS}",
        f"INSERT INTO total_values SELECT e.site_id, {name_sql}, {value_sql}, sum({VIEW}), count(*) "
        f"{source} GROUP BY 1, 2, 3 {ADD_COUNTS}",
        f"INSERT INTO daily_value_users SELECT DISTINCT e.site_id, {name_sql}, {value_sql}, {day}, "
        f"{USER} {source} AND {USER} IS NOT NULL ON CONFLICT DO NOTHING",
    ]


def _fold_statements():
    statements = [
        f"INSERT INTO hourly_totals SELECT site_id, substr(timestamp, 1, 13), sum({VIEW}), count(*) "
        f"{NEW_EVENTS} GROUP BY 1, 2 {ADD_COUNTS}",
        f"INSERT INTO hourly_users SELECT DISTINCT site_id, substr(timestamp, 1, 13), {USER} "
        f"{NEW_EVENTS} AND {USER} IS NOT NULL ON CONFLICT DO NOTHING",
    ]
    for name, value in PROPERTIES.items():
        statements += _value_statements(f"'{name}'", value, f"{NEW_EVENTS} AND {value} IS NOT NULL")
    # json_each has id and path columns of its own, hence the e. prefixes above
    props = ("FROM events AS e, json_each(e.props) AS prop WHERE e.id > :low AND e.id <= :high "
             f"AND e.props IS NOT NULL AND {COUNTED}")
    statements += _value_statements("'props.' || prop.key", "prop.value", props)
    return statements


FOLD_STATEMENTS = _fold_statements()
NEW_SITE_USERS = (f"INSERT INTO site_users SELECT DISTINCT site_id, {USER} {NEW_EVENTS} "
                  f"AND {USER} IS NOT NULL ON CONFLICT DO NOTHING RETURNING site_id")
SITE_TOTALS = (f"INSERT INTO site_totals SELECT site_id, sum({VIEW}), count(*), 0 {NEW_EVENTS} "
               f"GROUP BY 1 {ADD_COUNTS}")


def fold(connection, low, high):
    """Add the events with low < id <= high to every rollup.

    Call inside the transaction that inserted them.
    """
    bounds = {"low": low, "high": high}
    for statement in FOLD_STATEMENTS:
        connection.execute(statement, bounds)
    connection.execute(SITE_TOTALS, bounds)
    new_users = {}
    for (site_id,) in connection.execute(NEW_SITE_USERS, bounds).fetchall():
        new_users[site_id] = new_users.get(site_id, 0) + 1
    connection.executemany("UPDATE site_totals SET users = users + ? WHERE site_id = ?",
                           [(count, site_id) for site_id, count in new_users.items()])


def clear(connection):
    for table in TABLES:
        connection.execute(f"DELETE FROM {table}")
