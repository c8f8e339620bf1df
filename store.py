"""Where events are kept: schema, batch writes and the queries behind /stats.

The embedded default is SQLite (analytics.db). A store is chosen by URL in
config; every store offers the same verbs:

    store.migrate()                       bring the schema up to date
    store.write(rows, queue, checkpoint)  rows and queue position, one transaction
    store.checkpoint(queue)               the position stored with the last write
    store.stats(site_id, date, limit)     the /stats report
"""
import sqlite3
from contextlib import contextmanager
from datetime import datetime, time, timedelta, timezone

from events import format_timestamp

# Each entry moves the schema from version i to i + 1; never edit a released one.
MIGRATIONS = [
    """
    CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY,
        site_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        path TEXT,
        user_id TEXT,
        timestamp TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS events_site_time ON events (site_id, timestamp);
    CREATE TABLE IF NOT EXISTS queue_checkpoints (
        queue TEXT PRIMARY KEY,
        checkpoint TEXT NOT NULL
    );
    """,
]

EVENT_COLUMNS = ("site_id", "event_type", "path", "user_id", "timestamp")
INSERT_EVENT = "INSERT INTO events (site_id, event_type, path, user_id, timestamp) VALUES (?, ?, ?, ?, ?)"


def open_store(config):
    return SQLiteStore(config.database_path, durable=config.fsync == "always")


def day_range(day):
    """The [start, end) timestamps of one UTC date, in stored form."""
    start = datetime.combine(day, time(), tzinfo=timezone.utc)
    return format_timestamp(start), format_timestamp(start + timedelta(days=1))


class SQLiteStore:
    def __init__(self, path, durable=False):
        self.path = path
        self.durable = durable
        self._connection = None

    def connect(self, readonly=False):
        if readonly:
            connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                         timeout=5, check_same_thread=False)
        else:
            connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=" + ("FULL" if self.durable else "NORMAL"))
        connection.execute("PRAGMA busy_timeout=5000")
        return connection

    @property
    def connection(self):
        if self._connection is None:
            self._connection = self.connect()
        return self._connection

    def close(self):
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    @contextmanager
    def atomic(self):
        """One write transaction; IMMEDIATE so two writers queue instead of deadlocking."""
        connection = self.connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def migrate(self):
        with self.atomic() as connection:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {number}")
        return len(MIGRATIONS)

    def schema_version(self):
        return self.connection.execute("PRAGMA user_version").fetchone()[0]

    def write(self, rows, queue, checkpoint):
        """Insert rows and record the queue position they came from, atomically."""
        with self.atomic() as connection:
            connection.executemany(INSERT_EVENT, rows)
            connection.execute(
                "INSERT INTO queue_checkpoints (queue, checkpoint) VALUES (?, ?) "
                "ON CONFLICT (queue) DO UPDATE SET checkpoint = excluded.checkpoint",
                (queue, checkpoint))

    def checkpoint(self, queue):
        row = self.connection.execute(
            "SELECT checkpoint FROM queue_checkpoints WHERE queue = ?", (queue,)).fetchone()
        return row[0] if row else None

    def count_events(self):
        return self.connection.execute("SELECT count(*) FROM events").fetchone()[0]

    def stats(self, connection, site_id, day=None, limit=10):
        """The /stats report for one site, all time or one UTC day."""
        where, params = "site_id = ?", [site_id]
        if day is not None:
            where += " AND timestamp >= ? AND timestamp < ?"
            params += day_range(day)
        views = connection.execute(
            f"SELECT count(*) FROM events WHERE {where} AND event_type = 'page_view'",
            params).fetchone()[0]
        users = connection.execute(
            f"SELECT count(DISTINCT user_id) FROM events WHERE {where}", params).fetchone()[0]
        top_paths = connection.execute(
            f"SELECT path, count(*) AS views FROM events "
            f"WHERE {where} AND event_type = 'page_view' AND path IS NOT NULL "
            f"GROUP BY path ORDER BY views DESC, path ASC LIMIT ?",
            params + [limit]).fetchall()
        return {"total_views": views, "unique_users": users,
                "top_paths": [{"path": path, "views": count} for path, count in top_paths]}
