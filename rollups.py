"""Rollups: the aggregates every report reads, kept exact.

They are folded in the same transaction as the events they count, so they are
exactly-once too. Counts are summed per batch inside the database (one upsert
per distinct key, not per event); unique users are kept as sets of user ids
(tables keyed by what they count), so the number of distinct users over any
range of days is exact, never a sum of daily counts.

A breakdown property is one entry in PROPERTIES: its name and the SQL
expression over the events table that gives its value ('' for none).
"""

PROPERTIES = {
    "path": "coalesce(path, '')",
    "event_type": "event_type",
}

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
NEW_EVENTS = "FROM events WHERE id > :low AND id <= :high"
ADD_COUNTS = "ON CONFLICT DO UPDATE SET views = views + excluded.views, events = events + excluded.events"


def _fold_statements():
    statements = [
        f"INSERT INTO hourly_totals SELECT site_id, substr(timestamp, 1, 13), sum({VIEW}), count(*) "
        f"{NEW_EVENTS} GROUP BY 1, 2 {ADD_COUNTS}",
        f"INSERT INTO hourly_users SELECT DISTINCT site_id, substr(timestamp, 1, 13), user_id "
        f"{NEW_EVENTS} AND user_id IS NOT NULL ON CONFLICT DO NOTHING",
    ]
    for name, value in PROPERTIES.items():
        statements += [
            f"INSERT INTO daily_values SELECT site_id, '{name}', substr(timestamp, 1, 10), {value}, "
            f"sum({VIEW}), count(*) {NEW_EVENTS} GROUP BY 1, 3, 4 {ADD_COUNTS}",
            f"INSERT INTO total_values SELECT site_id, '{name}', {value}, sum({VIEW}), count(*) "
            f"{NEW_EVENTS} GROUP BY 1, 3 {ADD_COUNTS}",
            f"INSERT INTO daily_value_users SELECT DISTINCT site_id, '{name}', {value}, "
            f"substr(timestamp, 1, 10), user_id {NEW_EVENTS} AND user_id IS NOT NULL "
            f"ON CONFLICT DO NOTHING",
        ]
    return statements


FOLD_STATEMENTS = _fold_statements()
NEW_SITE_USERS = (f"INSERT INTO site_users SELECT DISTINCT site_id, user_id {NEW_EVENTS} "
                  f"AND user_id IS NOT NULL ON CONFLICT DO NOTHING RETURNING site_id")
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
