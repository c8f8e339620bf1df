"""Where events are kept: schema, migrations and batch writes.

The embedded default is SQLite (analytics.db); DATABASE_URL=postgresql://...
chooses PostgreSQL (postgres_store.py). Every store offers the same verbs:

    store.migrate()                       bring the schema up to date
    store.write(rows, queue, checkpoint)  rows, their rollups and the queue
                                          position, in one transaction
    store.checkpoint(queue)               the position stored with the last write
    store.reports(connection, first_day)  the report queries (reports.py)
    store.stream(sql, params)             the rows of a query as they are read (export)
    store.rebuild_rollups(progress)       recompute every rollup from the events
    store.delete_before(table, day, ...)  retention: one window of old rows deleted
"""
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from functools import lru_cache
from itertools import compress
from operator import is_not, itemgetter

import rollups
from config import POSTGRES_SCHEMES
from enrich import NOTHING
from rollups import ROW_COLUMNS
from reports import RawReports, RollupReports
from shared_queue import PRIVATE

log = logging.getLogger("store")
REBUILD_CHUNK = 100_000
WAL_SIZE_LIMIT = 64 * 1024 * 1024
UNENRICHED = len(ROW_COLUMNS) - len(NOTHING)      # the original columns and event_id come first
UNENRICHED_COLUMNS = tuple(range(UNENRICHED))
ALL_COLUMNS = tuple(range(len(ROW_COLUMNS)))
NOTHING_AT_ALL = (None,) * len(ROW_COLUMNS)


def _refold(connection, progress):
    rollups.clear(connection)
    low, high = connection.execute(
        "SELECT coalesce(min(id) - 1, 0), coalesce(max(id), 0) FROM events").fetchone()
    # ids have gaps (events retention deleted): progress counts rows
    total, done = connection.execute("SELECT count(*) FROM events").fetchone()[0], 0
    for start in range(low, high, REBUILD_CHUNK):
        rows = _stored_rows(connection, start, min(start + REBUILD_CHUNK, high))
        rollups.add_totals(connection, rollups.BatchTotals(rows))
        done += len(rows)
        if progress:
            progress(done, total)


def _stored_rows(connection, after_id, last_id):
    return connection.execute(f"SELECT {', '.join(ROW_COLUMNS)} FROM events WHERE id > ? AND id <= ?",
                              (after_id, last_id)).fetchall()


# Each entry moves the schema from version i to i + 1. Never edit a released one.
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
    """
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
    """,
    """
    ALTER TABLE events ADD COLUMN visitor_id TEXT;
    ALTER TABLE events ADD COLUMN referrer TEXT;
    ALTER TABLE events ADD COLUMN source TEXT;
    ALTER TABLE events ADD COLUMN utm_source TEXT;
    ALTER TABLE events ADD COLUMN utm_medium TEXT;
    ALTER TABLE events ADD COLUMN utm_campaign TEXT;
    ALTER TABLE events ADD COLUMN utm_term TEXT;
    ALTER TABLE events ADD COLUMN utm_content TEXT;
    ALTER TABLE events ADD COLUMN browser TEXT;
    ALTER TABLE events ADD COLUMN os TEXT;
    ALTER TABLE events ADD COLUMN device TEXT;
    ALTER TABLE events ADD COLUMN props TEXT;
    ALTER TABLE events ADD COLUMN scroll_depth INTEGER;
    ALTER TABLE events ADD COLUMN engaged_ms INTEGER;
    CREATE TABLE IF NOT EXISTS salts (day TEXT PRIMARY KEY, salt BLOB NOT NULL);
    """,
    """
    ALTER TABLE events ADD COLUMN event_id TEXT;
    CREATE UNIQUE INDEX IF NOT EXISTS events_event_id ON events (event_id);
    """,
    # a day's users with the hours they were seen in (see rollups.py), replacing the
    # per-hour set, and the day's count of them, kept by SQLite itself: the trigger
    # fires only for a row really inserted, not for an upsert that adds hours to an
    # existing one, so one statement per batch adds users and counts the new ones
    """
    CREATE TABLE daily_users (
        site_id TEXT NOT NULL, day TEXT NOT NULL, user_id TEXT NOT NULL, hours INTEGER NOT NULL,
        PRIMARY KEY (site_id, day, user_id)
    ) WITHOUT ROWID;
    CREATE TABLE daily_totals (
        site_id TEXT NOT NULL, day TEXT NOT NULL, users INTEGER NOT NULL,
        PRIMARY KEY (site_id, day)
    ) WITHOUT ROWID;
    INSERT INTO daily_users SELECT site_id, substr(hour, 1, 10), user_id,
        sum(1 << CAST(substr(hour, 12, 2) AS INTEGER)) FROM hourly_users GROUP BY 1, 2, 3;
    INSERT INTO daily_totals SELECT site_id, day, count(*) FROM daily_users GROUP BY 1, 2;
    DROP TABLE hourly_users;
    CREATE TRIGGER daily_users_counted AFTER INSERT ON daily_users BEGIN
        INSERT INTO daily_totals VALUES (new.site_id, new.day, 1)
        ON CONFLICT (site_id, day) DO UPDATE SET users = users + 1;
    END;
    """,
    # a day's values in ranking order, so that a one-day top list reads its first
    # rows instead of sorting every value the day had
    """
    CREATE INDEX daily_values_ranked ON daily_values (site_id, property, day, views DESC, events DESC,
                                                      value);
    """,
    # version five as first released counted a day's new users in the processor and made no
    # trigger: its databases get it now, and the days stored into them since are counted again
    """
    CREATE TRIGGER IF NOT EXISTS daily_users_counted AFTER INSERT ON daily_users BEGIN
        INSERT INTO daily_totals VALUES (new.site_id, new.day, 1)
        ON CONFLICT (site_id, day) DO UPDATE SET users = users + 1;
    END;
    DELETE FROM daily_totals;
    INSERT INTO daily_totals SELECT site_id, day, count(*) FROM daily_users GROUP BY 1, 2;
    """,
]
# upgrading from before this version folds the stored events afresh: there were no rollups
# before version 2, and version 2's counted paths and event types only, not sources
REFOLD_BEFORE = 3


def _statements(script):
    """The statements of a migration one by one, whole: a trigger's body has semicolons of its own."""
    statement = ""
    for piece in script.split(";"):
        statement += piece + ";"
        if sqlite3.complete_statement(statement):
            if statement.strip(" \n;"):
                yield statement
            statement = ""


def _insert(connection, rows):
    """Insert rows, skipping event ids already stored; return the rows really inserted.

    Each row binds only the columns it has values for (sqlite3 binds a None
    several times slower than a value), so rows are grouped by which columns
    they fill; most events fill exactly the columns before enrichment's.
    """
    last_id = connection.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
    groups = {}
    for row in rows:
        if row[UNENRICHED:] == NOTHING and None not in row[:UNENRICHED]:
            filled = UNENRICHED_COLUMNS
        else:
            filled = tuple(compress(ALL_COLUMNS, map(is_not, row, NOTHING_AT_ALL)))
        groups.setdefault(filled, []).append(row)
    inserted = 0
    for filled, group in groups.items():
        inserted += connection.executemany(_insert_statement(filled),
                                           map(itemgetter(*filled), group)).rowcount
    if inserted == len(rows):
        return rows
    # some event ids were there already (a queue delivered them again): only new rows count
    return _stored_rows(connection, last_id, connection.execute("SELECT max(id) FROM events").fetchone()[0])


@lru_cache(maxsize=256)
def _insert_statement(filled):
    # an event delivered twice (a queue redelivers after a crash) is stored once
    columns = [ROW_COLUMNS[index] for index in filled]
    return (f"INSERT INTO events ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
            "ON CONFLICT DO NOTHING")


class StoreUnavailable(Exception):
    """The database cannot be reached now; callers retry or answer 503.

    lasting: no wait will change it (a SQLite file that cannot be opened), as
    opposed to a server still starting or a database busy for now.
    """

    def __init__(self, message, lasting=False):
        super().__init__(message)
        self.lasting = lasting


class StoreBusy(StoreUnavailable):
    """Another program holds the database's write lock (a migration, rebuild-rollups): it is
    there and in use, only not free for this write now."""


class NewerSchema(StoreUnavailable):
    """The database was migrated by a newer version of this program (this one was rolled back
    to): this one would write rows the newer one's tables do not follow, so it writes none."""

    def __init__(self, where, version, known):
        super().__init__(f"{where} has schema version {version}, newer than this version's {known}: "
                         "a newer version of this program migrated it; run that one again (or "
                         "restore a backup from before the upgrade)", lasting=True)


class NotForThisStore(Exception):
    """A command this kind of store leaves to its own tools; the message names them."""


def _inode(path):
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


# SQLite's answers to opening a file that no wait will change: no such directory or
# no permission, not a database, a corrupt one (a busy database, by contrast, frees up)
SQLITE_LASTING = frozenset({"SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_NOTADB", "SQLITE_CORRUPT"})


def unavailable_or_bug(error, path):
    """A sqlite3 error as StoreUnavailable when it says the database cannot be used now.

    That is OperationalError (no file or directory, locked past the timeout)
    or a plain DatabaseError (not a database, a corrupt file); its other kinds
    (a wrong statement, a broken constraint) are bugs and stay what they are.
    """
    if isinstance(error, sqlite3.OperationalError) or type(error) is sqlite3.DatabaseError:
        return StoreUnavailable(f"SQLite {path}: {error}",
                                lasting=getattr(error, "sqlite_errorname", None) in SQLITE_LASTING)
    return error


def _create_private(path):
    """Create a database file its owner alone may read, whatever the umask: it holds user ids
    and the visitor salts (with which visitor ids can be recomputed from addresses). SQLite
    gives its -wal and -shm files the database's mode. An existing file keeps its mode, and a
    file that cannot be made is left for SQLite to report."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE))
    except OSError:
        pass


def open_store(config):
    if config.database_path.startswith(POSTGRES_SCHEMES):
        from postgres_store import PostgresStore
        return PostgresStore(config.database_path)
    return SQLiteStore(config.database_path, durable=config.fsync == "always")


def migrate_store(config, retry_every=1.0):
    """Bring the schema up to date at the API's start, and give back the connection it took.

    A database that cannot be reached yet (a PostgreSQL server still starting)
    is waited for, as the processor does; one that can never be opened is
    final. One that another program holds is left to it: that program is
    migrating it or rebuilding the rollups, which can take minutes (the first
    upgrade from schema version 1 or 2 folds every stored event into the
    rollups), and ingestion needs no database, so the API starts at once and
    its reports answer 503 until the schema is current.
    """
    store = open_store(config)
    try:
        while True:
            try:
                return store.migrate()
            except StoreBusy as error:
                log.warning("not migrating the database: %s; starting all the same, reports answer "
                            "503 until it is up to date", " ".join(str(error).split()))
                return None
            except NewerSchema as error:
                log.error("%s; taking events into the queue, for that version's processor to store",
                          error)
                return None
            except StoreUnavailable as error:
                if error.lasting:
                    raise
                log.warning("cannot migrate the database yet: %s; retrying in %.0fs",
                            " ".join(str(error).split()), retry_every)
                time.sleep(retry_every)
    finally:
        store.close()


class SQLiteStore:
    def __init__(self, path, durable=False, rollups=True):
        self.path = path
        self.durable = durable
        self.rollups = rollups      # off only to measure what rollups cost
        self._connection = None
        self._readers = threading.local()

    def describe(self):
        return self.path

    def connect(self, readonly=False):
        try:
            return self._connect(readonly)
        except sqlite3.DatabaseError as error:
            raise unavailable_or_bug(error, self.path) from error

    def _connect(self, readonly):
        if readonly:
            connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                         timeout=5, check_same_thread=False)
        else:
            _create_private(self.path)
            connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=" + ("FULL" if self.durable else "NORMAL"))
            # rollup upserts touch many pages; 48 MiB ran as fast as 64 here, and keeps
            # the processor under 150 MB with ua-parser's rules loaded
            connection.execute("PRAGMA cache_size=-49152")
            # deleted rows are overwritten, not left in free space: a visitor salt must be gone
            # when deleted (most builds, Debian's among them, do this by default; not all)
            connection.execute("PRAGMA secure_delete=ON")
            # SQLite reuses the log from its start once checkpointed but keeps the file's size: a
            # rebuild-rollups, or a backup holding checkpoints back, would keep its gigabytes for
            # as long as the processor or an API worker has the database open
            connection.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        connection.execute("PRAGMA busy_timeout=5000")
        return connection

    def reader(self):
        """A read-only connection for reports, in one snapshot until release().

        A report asks several questions (totals, then top paths); in one read
        transaction they all see the same commits of the processor.
        """
        connection = self._kept_reader()
        if not connection.in_transaction:
            connection.execute("BEGIN")
        return connection

    def _kept_reader(self):
        """A read-only connection, kept by each thread from one request to the next.

        Opening one costs more than a one-day report: SQLite reads the whole
        schema at a connection's first query. It is opened again when the
        database file or its write-ahead log was replaced or removed (a backup
        copied over the file keeps its inode, but a restore removes the log),
        so that it never reads a deleted file, and in a forked process.
        """
        try:
            identity = (os.getpid(), os.stat(self.path).st_ino, _inode(self.path + "-wal"))
        except OSError:
            identity = None                 # connect() says what is wrong
        kept = getattr(self._readers, "kept", None)
        if kept is not None and kept[0] == identity:
            return kept[1]
        self._readers.kept = None
        if kept is not None and kept[0][0] == os.getpid():
            kept[1].close()
        connection = self.connect(readonly=True)
        if identity is not None:
            self._readers.kept = (identity, connection)
        return connection

    def release(self, connection):
        """The end of a request's use of reader(): the connection stays open for the next one.

        Its snapshot ends here: an open read transaction would keep SQLite from
        checkpointing the write-ahead log past it.
        """
        if connection.in_transaction:
            connection.rollback()
        kept = getattr(self._readers, "kept", None)
        if kept is None or kept[1] is not connection:
            connection.close()

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
        """One write transaction; IMMEDIATE so two writers queue instead of deadlocking.

        A write lock held past the busy timeout, and a disk with no room for the
        write, are outages to wait out (the caller logs one line and retries),
        not bugs to show a traceback for.
        """
        connection = self.connection
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            if error.sqlite_errorname != "SQLITE_BUSY":
                raise
            raise StoreBusy(f"SQLite {self.path}: {error} (another program is writing it: "
                            "a migration, rebuild-rollups)") from error
        try:
            yield connection
            connection.execute("COMMIT")
        except BaseException as error:
            if connection.in_transaction:       # SQLite may have ended it (a full disk may)
                connection.execute("ROLLBACK")
            if getattr(error, "sqlite_errorname", None) == "SQLITE_FULL":
                raise StoreUnavailable(f"SQLite {self.path}: {error}") from error
            raise

    def migrate(self, create=True):
        """Bring the schema up to date; StoreUnavailable while another program holds the database.

        A schema already up to date takes no write lock: an API worker that
        starts (a reload, a worker replaced) while rebuild-rollups holds the
        lock for minutes must boot all the same. Without create, a database
        file that is not there is StoreUnavailable instead of made: a command
        that reads one (export, backup), run from the wrong directory, would
        read an empty one and succeed.
        """
        if not create:
            self._require_database()
        version = self.schema_version()
        if version > len(MIGRATIONS):
            raise NewerSchema(self.path, version, len(MIGRATIONS))
        if version == len(MIGRATIONS):
            return len(MIGRATIONS)
        with self.atomic() as connection:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                log.info("migrating %s to schema version %d", self.path, number)
                for statement in _statements(migration):
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {number}")
            if 0 < version < REFOLD_BEFORE:
                log.info("folding the existing events into the new rollups")
                _refold(connection, progress=None)
        return len(MIGRATIONS)

    def schema_version(self):
        return self.connection.execute("PRAGMA user_version").fetchone()[0]

    def _require_database(self):
        if not os.path.exists(self.path):
            raise StoreUnavailable(f"SQLite {self.path}: no database there; set DATA_DIR (or DATABASE_URL) "
                                   "to where the processor keeps it", lasting=True)

    def write(self, rows, queue, checkpoint):
        """Insert rows (of ROW_COLUMNS) and record the queue position they came from, atomically."""
        with self.atomic() as connection:
            inserted = _insert(connection, rows)
            if self.rollups and inserted:
                rollups.add_totals(connection, rollups.BatchTotals(inserted))
            if checkpoint is not None:
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

    def daily_salt(self, day, candidate, forget_before):
        """The salt of a UTC day, made from candidate by whoever asks first; older ones are deleted.

        One already made is read without the write lock, which another program
        may hold for minutes (a migration, rebuild-rollups) while API processes
        start and need the salt and the rate limit's key.
        """
        connection = self.connect()
        try:
            made = connection.execute("SELECT salt FROM salts WHERE day = ?", (day,)).fetchone()
            if made is not None:
                return made[0]
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("INSERT OR IGNORE INTO salts (day, salt) VALUES (?, ?)", (day, candidate))
            connection.execute("DELETE FROM salts WHERE day < ?", (forget_before,))
            salt = connection.execute("SELECT salt FROM salts WHERE day = ?", (day,)).fetchone()[0]
            connection.execute("COMMIT")
            return salt
        except sqlite3.DatabaseError as error:
            raise unavailable_or_bug(error, self.path) from error
        finally:
            connection.close()

    def forget_salts(self, before):
        """Delete the salts of the days before before ('YYYY-MM-DD'); the rate limit's key stays."""
        with self.atomic() as connection:
            connection.execute("DELETE FROM salts WHERE day < ?", (before,))

    def reports(self, connection, raw=False, first_day=None):
        return (RawReports if raw else RollupReports)(connection, first_day=first_day)

    def stream(self, sql, params):
        """The rows of a read-only query, one by one as they are read: never all in memory."""
        connection = self.connect(readonly=True)
        try:
            yield from connection.execute(sql, params)
        finally:
            connection.close()

    def rebuild_rollups(self, progress=None):
        """Recompute every rollup from the events table, in one transaction."""
        with self.atomic() as connection:
            _refold(connection, progress)

    def backup(self, destination):
        """A consistent copy of the database, taken while the processor and the API run.

        One read transaction copies every page (SQLite's online backup): in
        WAL mode it blocks no writer, and copying in steps would start over
        whenever the processor commits. The copy is written beside the
        destination and renamed into place, so a failed backup leaves no
        half-written file under its name. Missing directories of the
        destination are made; anything else that stops the copy being
        written is an OSError naming the destination.
        """
        self._require_database()
        partial = f"{destination}.partial"
        source = self.connection        # a database that cannot be opened is StoreUnavailable
        try:
            os.makedirs(os.path.dirname(destination) or ".", exist_ok=True)
            _create_private(partial)
            target = sqlite3.connect(partial)
            try:
                source.backup(target)
            finally:
                target.close()
            os.replace(partial, destination)
        except (OSError, sqlite3.Error) as error:
            raise OSError(f"cannot write {destination}: {error}") from error
        finally:
            # a copy cut short (a full disk, Ctrl-C, SIGTERM, SIGHUP) is of no use, and holds every
            # user id and visitor salt under a name no one looks for
            if os.path.isfile(partial):
                os.remove(partial)

    def delete_before(self, table, day, after=None, limit=5000):
        """Delete old rows of one window of a dated table, in one transaction (see delete_window)."""
        with self.atomic() as connection:
            return delete_window(connection, table, day, after, limit)


# The tables retention deletes from: their walking key (a prefix of the primary
# key, so windows are index ranges) and the column holding their UTC date.
DATED_TABLES = {
    "events": (("id",), "timestamp"),
    "hourly_totals": (("site_id", "hour"), "hour"),
    "daily_users": (("site_id", "day", "user_id"), "day"),
    "daily_totals": (("site_id", "day"), "day"),
    "daily_values": (("site_id", "property", "day", "value"), "day"),
    "daily_value_users": (("site_id", "property", "value", "day", "user_id"), "day"),
}


def delete_window(connection, table, day, after, limit, keys=None):
    """Delete the rows dated before day ('YYYY-MM-DD') among the next limit rows after key after.

    Returns (rows deleted, the window's last key to pass as after next time,
    or None once the window reached the end of the table). Walking the table
    by key bounds each transaction to limit rows however few are old, and
    needs no index on the date. Dates compare as text: '2025-03-01T10' and
    '2025-03-01T10:00:00.000Z' both sort after '2025-03-01'. keys: the
    store's own walking key where it differs from DATED_TABLES' (SQL expressions).
    """
    columns, dated = DATED_TABLES[table]
    columns = (keys or {}).get(table, columns)
    key = f"({', '.join(columns)})"
    params = {"day": day, "offset": limit - 1}
    start = "TRUE"
    if after is not None:
        start = f"{key} > ({', '.join(f':after{i}' for i in range(len(columns)))})"
        params.update({f"after{i}": value for i, value in enumerate(after)})
    last = connection.execute(f"SELECT {', '.join(columns)} FROM {table} WHERE {start} "
                              f"ORDER BY {', '.join(columns)} LIMIT 1 OFFSET :offset", params).fetchone()
    end = "TRUE"
    if last is not None:
        end = f"{key} <= ({', '.join(f':last{i}' for i in range(len(columns)))})"
        params.update({f"last{i}": value for i, value in enumerate(last)})
    deleted = connection.execute(f"DELETE FROM {table} WHERE {start} AND {end} AND {dated} < :day",
                                 params).rowcount
    return deleted, (tuple(last) if last is not None else None)
