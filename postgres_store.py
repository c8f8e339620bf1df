"""The store on PostgreSQL, for several processors and API nodes.

    DATABASE_URL=postgresql://user@host:5432/analytics

The same tables, rollups and report queries as SQLite (store.py, rollups.py,
reports.py); what differs is said here. Rows arrive by COPY into a staging
table, then one INSERT ... ON CONFLICT (event_id) DO NOTHING RETURNING puts
the really new ones in a temporary table that the rollups are folded from,
so an event delivered twice is stored and counted once. Counter rows carry
the processor's shard number so that processors never wait on each other's
counters; reports sum over shards.
"""
import logging
import os
import re
import threading
import time
from contextlib import contextmanager

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

import rollups
from config import PERCENT_ENCODE_PASSWORD, without_password
from reports import RawReports, RollupReports
from store import REBUILD_CHUNK, ROW_COLUMNS, NewerSchema, NotForThisStore, StoreUnavailable, delete_window

log = logging.getLogger("store")
# The pool warns once per failed connection attempt, several times a second while the server
# is down; the StoreUnavailable that callers log says why once per try of theirs instead.
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
SHARDS = 16
# compared in byte order, as the rollup columns are, whatever the database's collation
JSON_VALUE = "((props::jsonb ->> '{key}') COLLATE \"C\")"
JSON_PAIRS = "LATERAL (SELECT key COLLATE \"C\" AS key FROM jsonb_object_keys(props::jsonb) AS key) AS prop"
# after the pool waited its 5 s for a connection in vain, callers fail at once for this
# long: a sync API worker waiting 5 s per report or browser event during an outage is a
# worker not taking POST /event, which needs no database
UNREACHABLE_PAUSE = 2.0
STREAM_ROWS = 5000                  # rows per round trip of stream()
MIGRATION_LOCK = 7_243_001          # pg_advisory_xact_lock key: one migrator at a time

COLUMN_TYPES = {"scroll_depth": "INTEGER", "engaged_ms": "INTEGER"}
TEXT = 'TEXT COLLATE "C"'            # byte order, as SQLite compares text
EVENTS = ",\n    ".join(f"{column} {COLUMN_TYPES.get(column, TEXT)}" for column in ROW_COLUMNS)

# Each entry moves the schema from version i to i + 1. Never edit a released one.
MIGRATIONS = [
    f"""
    CREATE TABLE events (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        {EVENTS}
    );
    ALTER TABLE events ALTER COLUMN site_id SET NOT NULL, ALTER COLUMN event_type SET NOT NULL,
        ALTER COLUMN timestamp SET NOT NULL;
    CREATE INDEX events_site_time ON events (site_id, timestamp);
    CREATE UNIQUE INDEX events_event_id ON events (event_id);
    CREATE TABLE queue_checkpoints (queue {TEXT} PRIMARY KEY, checkpoint TEXT NOT NULL);
    CREATE TABLE salts (day TEXT PRIMARY KEY, salt BYTEA NOT NULL);
    CREATE TABLE site_totals (site_id {TEXT} NOT NULL, views BIGINT NOT NULL, events BIGINT NOT NULL,
        users BIGINT NOT NULL, shard INTEGER NOT NULL, PRIMARY KEY (site_id, shard));
    CREATE TABLE site_users (site_id {TEXT} NOT NULL, user_id {TEXT} NOT NULL,
        PRIMARY KEY (site_id, user_id));
    CREATE TABLE hourly_totals (site_id {TEXT} NOT NULL, hour {TEXT} NOT NULL, views BIGINT NOT NULL,
        events BIGINT NOT NULL, shard INTEGER NOT NULL, PRIMARY KEY (site_id, hour, shard));
    CREATE TABLE hourly_users (site_id {TEXT} NOT NULL, hour {TEXT} NOT NULL, user_id {TEXT} NOT NULL,
        PRIMARY KEY (site_id, hour, user_id));
    CREATE TABLE daily_values (site_id {TEXT} NOT NULL, property {TEXT} NOT NULL, day {TEXT} NOT NULL,
        value {TEXT} NOT NULL, views BIGINT NOT NULL, events BIGINT NOT NULL, shard INTEGER NOT NULL,
        PRIMARY KEY (site_id, property, day, value, shard));
    CREATE TABLE total_values (site_id {TEXT} NOT NULL, property {TEXT} NOT NULL, value {TEXT} NOT NULL,
        views BIGINT NOT NULL, events BIGINT NOT NULL, shard INTEGER NOT NULL,
        PRIMARY KEY (site_id, property, value, shard));
    CREATE TABLE daily_value_users (site_id {TEXT} NOT NULL, property {TEXT} NOT NULL,
        value {TEXT} NOT NULL, day {TEXT} NOT NULL, user_id {TEXT} NOT NULL,
        PRIMARY KEY (site_id, property, value, day, user_id))
    """,
    # a day's users with the hours they were seen in (see rollups.py), replacing the
    # per-hour set, and the day's count of them (per shard, as every counter)
    f"""
    CREATE TABLE daily_users (site_id {TEXT} NOT NULL, day {TEXT} NOT NULL, user_id {TEXT} NOT NULL,
        hours INTEGER NOT NULL, PRIMARY KEY (site_id, day, user_id));
    CREATE TABLE daily_totals (site_id {TEXT} NOT NULL, day {TEXT} NOT NULL, users BIGINT NOT NULL,
        shard INTEGER NOT NULL, PRIMARY KEY (site_id, day, shard));
    INSERT INTO daily_users SELECT site_id, substr(hour, 1, 10), user_id,
        bit_or(1 << CAST(substr(hour, 12, 2) AS INTEGER)) FROM hourly_users GROUP BY 1, 2, 3;
    INSERT INTO daily_totals SELECT site_id, day, count(*), 0 FROM daily_users GROUP BY 1, 2;
    DROP TABLE hourly_users
    """,
    # The value tables are keyed by value_key(value) instead of the value: a B-tree entry
    # holds at most 2,704 bytes, less than a value may take in UTF-8 (a 2,048-character
    # path of CJK is 6 KB), and inserting such a row failed the batch for good. A value of
    # up to 256 bytes is its own key, as before; a longer one is keyed by its SHA-256 (of
    # its bytes: decode reads them back once every backslash is doubled), in hex padded to
    # 257 bytes so that it never equals a shorter value. The longest key left, in
    # daily_value_users with a site_id and a user_id of 256 four-byte characters, is about
    # 2,400 bytes. The rows stay as they were, text included; the keys are unique indexes
    # on the expression (a primary key cannot hold one). Hashing only long values keeps
    # the processor as fast as it was: hashing every value cost PostgreSQL ~15% more CPU.
    # value_key is immutable, as an index needs, and not STRICT: PostgreSQL inlines only
    # a strict function whose body is strict, which a CASE is not, and the call of a SQL
    # function that is not inlined cost 3 µs a row. Safe to run again.
    r"""
    CREATE OR REPLACE FUNCTION value_key(value TEXT) RETURNS TEXT LANGUAGE sql
        IMMUTABLE PARALLEL SAFE
        RETURN CASE WHEN octet_length(value) <= 256 THEN value
            ELSE lpad(encode(sha256(decode(replace(value, E'\\', E'\\\\'), 'escape')), 'hex'), 257, '#') END;
    ALTER TABLE daily_values DROP CONSTRAINT IF EXISTS daily_values_pkey;
    CREATE UNIQUE INDEX IF NOT EXISTS daily_values_key
        ON daily_values (site_id, property, day, value_key(value), shard);
    ALTER TABLE total_values DROP CONSTRAINT IF EXISTS total_values_pkey;
    CREATE UNIQUE INDEX IF NOT EXISTS total_values_key ON total_values (site_id, property, value_key(value), shard);
    ALTER TABLE daily_value_users DROP CONSTRAINT IF EXISTS daily_value_users_pkey;
    CREATE UNIQUE INDEX IF NOT EXISTS daily_value_users_key
        ON daily_value_users (site_id, property, value_key(value), day, user_id)
    """,
]

# retention walks the value tables by their unique indexes, which key value by value_key(value)
WALKING_KEYS = {"daily_values": ("site_id", "property", "day", "value_key(value)"),
                "daily_value_users": ("site_id", "property", "value_key(value)", "day", "user_id")}

NEW_ROWS = rollups.Dialect(
    new_events="FROM new_events AS e WHERE TRUE",
    props_join="FROM new_events AS e, jsonb_each_text(e.props::jsonb) AS prop(key, value) "
               "WHERE e.props IS NOT NULL")
# a string literal (left as it is: a prop key such as 'x :y' is no parameter), or a :name
_NAMED = re.compile(r"('(?:[^']|'')*')|(?<![:\w]):([a-z_][a-z0-9_]*)")


def check_url(url):
    """Raise ValueError if libpq cannot read a database URL, without connecting.

    libpq finds it out only when it connects, so the programs would wait for a server that
    is not down, logging at every try libpq's message, which quotes what it could not read:
    in a URL with a raw @, /, % or space in its password, the password or a part of it.
    """
    try:
        options = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        options = None
    if options is None or "@" in options.get("host", "") or not all(
            port.isdigit() for port in options.get("port", "").split(",") if port):
        raise ValueError("libpq cannot read it: write it as postgresql://user:password@host:5432/db with "
                         f"libpq's ?parameters, and {PERCENT_ENCODE_PASSWORD}")


def to_pyformat(sql):
    """:name parameters (the form every shared query is written in) as psycopg's %(name)s."""
    return _NAMED.sub(lambda match: match[1] or f"%({match[2]})s", sql.replace("%", "%%"))


class Connection:
    """A pooled connection that speaks the :name parameter style of the shared queries."""

    def __init__(self, connection, release=None):
        self.raw = connection
        self._release = release

    def execute(self, sql, params=None):
        try:
            return self.raw.execute(to_pyformat(sql), params or {})
        except psycopg.OperationalError as error:
            raise StoreUnavailable(f"PostgreSQL: {error}") from error

    def executemany(self, sql, rows):
        with self.raw.cursor() as cursor:
            cursor.executemany(to_pyformat(sql), rows)

    def close(self):
        if self._release:
            self._release(self.raw)
            self._release = None


class PostgresStore:
    def __init__(self, url, shard=None, rollups_on=True):
        self.url = url
        self.shard = os.getpid() % SHARDS if shard is None else shard
        self.rollups = rollups_on
        self._pool = None
        self._pid = None
        self._lock = threading.Lock()
        self._unreachable_until, self._unreachable_error = 0.0, None

    def backup(self, destination):
        raise NotForThisStore("a PostgreSQL store is backed up with pg_dump, not by this command")

    def describe(self):
        """The URL for the log: never the password, before the host or as a parameter."""
        return without_password(self.url)

    @property
    def pool(self):
        with self._lock:
            if self._pid != os.getpid():                   # a forked worker needs its own
                # Nothing is prepared on the server (psycopg prepares a query run 5 times): behind
                # PgBouncer in transaction mode, before 1.21, a client's next transaction may run on
                # another server connection, where its statement is missing or is another client's
                # ("_pg3_0" already exists). Preparing saved the processor and the reports no measurable CPU.
                self._pool = ConnectionPool(self.url, min_size=1, max_size=8, timeout=5,
                                            kwargs={"prepare_threshold": None},
                                            check=ConnectionPool.check_connection,
                                            open=False, name="analytics")
                self._pool.open(wait=False)
                self._pid = os.getpid()
            return self._pool

    @contextmanager
    def atomic(self):
        self._fail_fast_while_unreachable()
        try:
            with self.pool.connection() as connection, connection.transaction():
                yield Connection(connection)
        except PoolTimeout as error:
            raise self._unreachable(error) from error
        except psycopg.OperationalError as error:
            raise StoreUnavailable(f"PostgreSQL: {error}") from error

    def connect(self, readonly=False):
        """A connection for reports; close() gives it back to the pool."""
        self._fail_fast_while_unreachable()
        try:
            raw = self.pool.getconn()
        except PoolTimeout as error:
            raise self._unreachable(error) from error
        raw.autocommit = True
        return Connection(raw, release=self.pool.putconn)

    def _fail_fast_while_unreachable(self):
        if time.monotonic() < self._unreachable_until:
            raise StoreUnavailable(self._unreachable_error)

    def _unreachable(self, timeout):
        """The pool waited in vain: callers fail at once for UNREACHABLE_PAUSE."""
        self._unreachable_error = f"PostgreSQL: {self._why_unreachable(timeout)}"
        self._unreachable_until = time.monotonic() + UNREACHABLE_PAUSE
        return StoreUnavailable(self._unreachable_error)

    def _why_unreachable(self, timeout):
        """The pool's timeout does not say why it has no connection: one attempt of our own does
        (connection refused, authentication failed, ...). If that one succeeds, the pool was full."""
        try:
            psycopg.connect(self.url, connect_timeout=2).close()
        except psycopg.Error as error:
            return " ".join(str(error).split())
        return str(timeout)

    def reader(self):
        """A connection for reports, from the pool, in one snapshot until release().

        A report asks several questions; in one REPEATABLE READ transaction
        they all see the same commits of the processors.
        """
        connection = self.connect(readonly=True)
        try:
            connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        except StoreUnavailable:
            connection.close()                  # back to the pool, which checks it before reuse
            raise
        return connection

    def release(self, connection):
        try:
            connection.execute("ROLLBACK")      # the snapshot's end
        except StoreUnavailable:
            pass                                # the pool checks a broken connection before reuse
        finally:
            connection.close()                  # back to the pool

    @property
    def connection(self):
        return self.connect()

    def close(self):
        if self._pool is not None and self._pid == os.getpid():
            self._pool.close()
        self._pool = self._pid = None

    def migrate(self, create=True):
        """Bring the schema up to date; a schema already current takes no DDL, so that a login
        that may only read and write rows runs on a schema its owner migrated. (create is
        SQLiteStore's: a server's database is there before any program connects.)"""
        try:
            with self.atomic() as connection:
                connection.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
                version = self._schema_version(connection)
                if version > len(MIGRATIONS):
                    raise NewerSchema(self.describe(), version, len(MIGRATIONS))
                for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                    log.info("migrating %s to schema version %d", self.describe(), number)
                    for statement in filter(str.strip, migration.split(";")):
                        connection.execute(statement)
                    connection.execute("INSERT INTO schema_version VALUES (:v)", {"v": number})
        except psycopg.errors.InsufficientPrivilege as error:
            # no wait will grant it: say so once and stop, as for a SQLite file that cannot be opened
            raise StoreUnavailable(
                f"PostgreSQL: {error.diag.message_primary}; the schema is not up to date and this "
                f"user may not change it: grant it CREATE on the schema (or own it), or start once "
                f"as a user that may", lasting=True) from error
        return len(MIGRATIONS)

    @staticmethod
    def _schema_version(connection):
        if connection.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
            connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            return 0
        return connection.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0

    def write(self, rows, queue, checkpoint):
        """COPY the rows in, keep the new ones, fold them, record the checkpoint: one transaction."""
        with self.atomic() as connection:
            raw = connection.raw
            columns = ", ".join(ROW_COLUMNS)
            raw.execute(f"CREATE TEMP TABLE IF NOT EXISTS staging AS SELECT {columns} FROM events "
                        "WITH NO DATA")
            raw.execute("CREATE TEMP TABLE IF NOT EXISTS new_events AS SELECT * FROM events WITH NO DATA")
            raw.execute("TRUNCATE staging, new_events")
            with raw.cursor().copy(f"COPY staging ({columns}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            raw.execute(f"WITH inserted AS (INSERT INTO events ({columns}) SELECT {columns} FROM staging "
                        "ORDER BY event_id ON CONFLICT (event_id) DO NOTHING RETURNING *) "
                        "INSERT INTO new_events SELECT * FROM inserted")
            if self.rollups:
                rollups.fold(connection, self._dialect(), {})
            if checkpoint is not None:
                connection.execute(
                    "INSERT INTO queue_checkpoints (queue, checkpoint) VALUES (:queue, :checkpoint) "
                    "ON CONFLICT (queue) DO UPDATE SET checkpoint = excluded.checkpoint",
                    {"queue": queue, "checkpoint": checkpoint})

    def _dialect(self):
        return rollups.Dialect(NEW_ROWS.new_events, NEW_ROWS.props_join, shard=self.shard,
                               value_key="value_key(value)")

    def checkpoint(self, queue):
        with self.atomic() as connection:
            row = connection.execute("SELECT checkpoint FROM queue_checkpoints WHERE queue = :queue",
                                     {"queue": queue}).fetchone()
        return row[0] if row else None

    def daily_salt(self, day, candidate, forget_before):
        with self.atomic() as connection:
            connection.execute("INSERT INTO salts (day, salt) VALUES (:day, :salt) ON CONFLICT DO NOTHING",
                               {"day": day, "salt": candidate})
            connection.execute("DELETE FROM salts WHERE day < :day", {"day": forget_before})
            return bytes(connection.execute("SELECT salt FROM salts WHERE day = :day",
                                            {"day": day}).fetchone()[0])

    def forget_salts(self, before):
        with self.atomic() as connection:
            connection.execute("DELETE FROM salts WHERE day < :day", {"day": before})

    def reports(self, connection, raw=False, first_day=None):
        return RawReports(connection, JSON_VALUE, JSON_PAIRS, first_day) if raw else RollupReports(
            connection, sharded=True, value_key="value_key({})", first_day=first_day)   # see MIGRATIONS

    def stream(self, sql, params):
        """As SQLiteStore.stream: in chunks of rows, where a plain query would hold them all in memory
        (an export of a few million events took gigabytes)."""
        connection = self.connect(readonly=True)
        try:
            yield from connection.raw.cursor().stream(to_pyformat(sql), params, size=STREAM_ROWS)
        except psycopg.OperationalError as error:
            raise StoreUnavailable(f"PostgreSQL: {error}") from error
        finally:
            connection.close()

    def rebuild_rollups(self, progress=None):
        with self.atomic() as connection:
            # no writes while we count, and one rebuild at a time: a second one's DELETE would
            # not see the rows the first inserted, and add to them
            connection.raw.execute("LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE")
            rollups.clear(connection)
            connection.raw.execute("CREATE TEMP TABLE IF NOT EXISTS new_events AS "
                                   "SELECT * FROM events WITH NO DATA")
            low, high = connection.execute(
                "SELECT coalesce(min(id) - 1, 0), coalesce(max(id), 0) FROM events").fetchone()
            # ids have gaps (rolled back batches, conflicts, retention): progress counts rows
            total, done = connection.execute("SELECT count(*) FROM events").fetchone()[0], 0
            for start in range(low, high, REBUILD_CHUNK):
                end = min(start + REBUILD_CHUNK, high)
                connection.raw.execute("TRUNCATE new_events")
                done += connection.execute("INSERT INTO new_events SELECT * FROM events WHERE id > :low "
                                           "AND id <= :high", {"low": start, "high": end}).rowcount
                rollups.fold(connection, self._dialect(), {})
                if progress:
                    progress(done, total)

    def delete_before(self, table, day, after=None, limit=5000):
        """As SQLiteStore.delete_before; concurrent processors deleting the same rows only wait."""
        with self.atomic() as connection:
            return delete_window(connection, table, day, after, limit, keys=WALKING_KEYS)
