"""What only the PostgreSQL store has: its own migrations, and databases whose collation is not C."""
import signal
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import psycopg
import pytest

from config import load_config
from conftest import POSTGRES
from ingestion_api import create_app
from postgres_store import MIGRATIONS, PostgresStore
from processes import (REPO, environment, exit_code, free_port, log_tail, run_processor_once,
                       start_processor, wait_for)
from processor import Processor
from reports import Period
from shared_queue import open_queue
from store import StoreUnavailable, open_store

VALUE_TABLES = {"daily_values": "site_id, property, day, value, shard",
                "total_values": "site_id, property, value, shard",
                "daily_value_users": "site_id, property, value, day, user_id"}


@pytest.fixture
def backend():
    return "file+postgresql"


def signup(client, site, props):
    event = {"n": "Signup", "d": site, "u": f"http://{site}/pricing", "p": props}
    assert client.post("/api/event", json=event, headers={"User-Agent": "Mozilla/5.0 Firefox/140.0"},
                       environ_base={"REMOTE_ADDR": "203.0.113.7"}).status_code == 202


def value_tables(connection):
    return {table: connection.execute(f"SELECT * FROM {table} ORDER BY {key}").fetchall()
            for table, key in VALUE_TABLES.items()}


def test_upgrading_to_keys_of_any_length_keeps_the_value_rows_and_adds_to_them(config, client, drain):
    for number in range(40):
        event = {"site_id": "s", "event_type": ["page_view", "click"][number % 2], "path": f"/p{number % 5}",
                 "user_id": f"u{number % 7}"}
        assert client.post("/event", json=event).status_code == 200
    signup(client, "s", {"plan": "pro"})
    drain()
    store = open_store(config)
    latest = store.migrate()
    keyed = next(number for number, migration in enumerate(MIGRATIONS) if "value_key" in migration)
    with store.atomic() as connection:      # back to the version before, as a database of that version is
        before = value_tables(connection)
        connection.execute("DROP INDEX daily_values_key, total_values_key, daily_value_users_key")
        connection.execute("DROP FUNCTION value_key")
        for table, key in VALUE_TABLES.items():
            connection.execute(f"ALTER TABLE {table} ADD PRIMARY KEY ({key})")
        connection.execute("DELETE FROM schema_version WHERE version > :v", {"v": keyed})
    assert store.migrate() == latest
    with store.atomic() as connection:
        assert value_tables(connection) == before
    store.close()

    assert client.post("/event", json={"site_id": "s", "event_type": "page_view", "path": "/p0",
                                       "user_id": "u0"}).status_code == 200
    long_path = "/" + "".join(chr(0x20000 + number) for number in range(2047))      # 8 KB in UTF-8
    assert client.post("/event", json={"site_id": "s", "event_type": "page_view", "path": long_path}).status_code == 200
    drain()
    store = open_store(config)
    connection = store.connect(readonly=True)
    rollup, raw = store.reports(connection), store.reports(connection, raw=True)
    paths = {row["value"]: row for row in rollup.breakdown("s", "path", Period(), 10)}
    assert paths["/p0"] == {"value": "/p0", "views": 5, "events": 9, "unique_users": 7}
    assert len(paths) == 7          # five, /pricing and the long one
    for prop in ("path", "event_type", "props.plan"):
        assert rollup.breakdown("s", prop, Period(), 10) == raw.breakdown("s", prop, Period(), 10)
    # this processor's counts went into the upgraded rows, not into new rows beside them
    assert connection.execute("SELECT count(*) FROM total_values WHERE property = 'path'").fetchone()[0] == 7
    connection.close()
    store.close()


def administer(sql):
    with psycopg.connect(f"{POSTGRES}/test", autocommit=True) as connection:
        connection.execute(sql)


@pytest.fixture
def icu_database():
    """A database of its own whose default collation is ICU's en-US (a < A < b < B), dropped afterwards."""
    name = f"analytics_test_icu_{uuid.uuid4().hex[:12]}"
    administer(f"CREATE DATABASE {name} LOCALE_PROVIDER icu ICU_LOCALE 'en-US' TEMPLATE template0")
    yield f"{POSTGRES}/{name}"
    administer(f"DROP DATABASE {name} WITH (FORCE)")


def test_props_tied_on_counts_are_ranked_in_byte_order_whatever_the_database_collation(tmp_path, icu_database):
    config = load_config(environ={}, data_dir=str(tmp_path), database_url=icu_database)
    app = create_app(config)
    for plan in ("a", "B", "b", "A"):
        signup(app.test_client(), "s", {"plan": plan})
    processor = Processor(open_queue(config), open_store(config), config)
    processor.start()
    processor.run(once=True)
    store = open_store(config)
    connection = store.connect(readonly=True)
    rollup, raw = store.reports(connection), store.reports(connection, raw=True)
    assert [row["value"] for row in rollup.breakdown("s", "props.plan", Period(), 4)] == ["A", "B", "a", "b"]
    for limit in (1, 2, 4):
        assert raw.breakdown("s", "props.plan", Period(), limit) == \
            rollup.breakdown("s", "props.plan", Period(), limit)
    connection.close()
    store.close()
    app.extensions["analytics"]["store"].close()
    app.extensions["analytics"]["queue"].close()


@contextmanager
def connections_lost_once_checked(pool):
    """The server drops each connection the pool hands out between the pool's check and its use."""
    checked = pool._check

    def check_then_lose(connection):
        checked(connection)
        administer(f"SELECT pg_terminate_backend({connection.info.backend_pid})")
    pool._check = check_then_lose
    try:
        yield
    finally:
        pool._check = checked


def test_a_report_connection_lost_before_its_snapshot_begins_goes_back_to_the_pool(postgres_database):
    store = PostgresStore(postgres_database)
    with connections_lost_once_checked(store.pool):
        for _ in range(store.pool.max_size + 1):   # one more than the pool holds: none may be kept
            with pytest.raises(StoreUnavailable):
                store.reader()
    connection = store.reader()          # the pool still has room
    store.release(connection)
    store.close()


def test_programs_started_together_on_a_new_database_all_migrate_it(postgres_database):
    """The API and its processors started at once (compose, systemd) on an empty database."""
    starting = threading.Barrier(6)

    def start():
        store = PostgresStore(postgres_database)
        store.pool.wait()
        starting.wait()
        try:
            return store.migrate()
        finally:
            store.close()
    with ThreadPoolExecutor(6) as programs:
        assert list(programs.map(lambda _: start(), range(6))) == [len(MIGRATIONS)] * 6


def test_a_write_whose_connection_is_lost_is_an_outage_to_retry(postgres_database):
    store = PostgresStore(postgres_database)
    store.migrate()
    with connections_lost_once_checked(store.pool), pytest.raises(StoreUnavailable):
        store.write([], "q", "not stored")
    store.write([], "q", "stored")
    assert store.checkpoint("q") == "stored"
    store.close()


@pytest.fixture
def database_user(postgres_database):
    """A login of its own that may use the test schema but create nothing in it; yields its URL."""
    name = f"analytics_test_user_{uuid.uuid4().hex[:12]}"
    schema = postgres_database.rpartition("%3D")[2]
    administer(f"CREATE ROLE {name} LOGIN")
    administer(f"GRANT USAGE ON SCHEMA {schema} TO {name}")
    yield postgres_database.replace("postgres@", f"{name}@")
    administer(f"DROP OWNED BY {name}")
    administer(f"DROP ROLE {name}")


def grant_reading_and_writing(schema_url, user_url):
    """What a DBA gives the programs' login on a schema its owner migrated: rows, not tables."""
    schema, user = schema_url.rpartition("%3D")[2], user_url.split("//")[1].split("@")[0]
    administer(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {user}")


def test_a_user_that_may_only_read_and_write_rows_runs_on_a_schema_its_owner_migrated(
        tmp_path, postgres_database, database_user):
    owner = PostgresStore(postgres_database)
    owner.migrate()
    owner.close()
    grant_reading_and_writing(postgres_database, database_user)
    config = load_config(environ={}, data_dir=str(tmp_path), database_url=database_user)
    client = create_app(config).test_client()
    signup(client, "s", {"plan": "pro"})
    processor = Processor(open_queue(config), open_store(config), config)
    processor.start()
    processor.run(once=True)
    assert client.get("/stats?site_id=s").get_json()["unique_users"] == 1


def test_a_user_that_may_not_create_the_schema_stops_the_processor_in_one_line(data_dir, database_user,
                                                                               children):
    processor = start_processor(data_dir, DATABASE_URL=database_user)
    children.append(processor)
    assert exit_code(processor, timeout=30) == 2
    log = log_tail(data_dir, "processor")
    assert "cannot start: PostgreSQL: permission denied for schema" in log
    assert "CREATE" in log and "Traceback" not in log


def test_a_user_that_may_not_create_the_schema_stops_gunicorn_in_one_line(tmp_path, database_user):
    result = subprocess.run([sys.executable, "-m", "gunicorn", "ingestion_api:app"], cwd=REPO,
                            capture_output=True, text=True, timeout=60,
                            env=environment(tmp_path, PORT=free_port(), DATABASE_URL=database_user))
    assert result.returncode != 0
    assert "cannot start: PostgreSQL: permission denied for schema" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_processor_waiting_for_postgresql_says_why_in_its_own_lines_alone(data_dir, children):
    processor = start_processor(data_dir, DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    children.append(processor)
    wait_for(lambda: log_tail(data_dir, "processor").count("cannot start yet") >= 3, 60, "three tries")
    processor.send_signal(signal.SIGTERM)
    assert exit_code(processor, timeout=30) == 0
    lines = log_tail(data_dir, "processor", size=100_000).splitlines()
    waits = [line for line in lines if "cannot start yet" in line]
    assert all("Connection refused" in line for line in waits), waits
    assert not [line for line in lines if "psycopg" in line]      # no line per attempt of the pool's own


@pytest.mark.parametrize("where", ["user", "query"])
def test_the_password_of_the_database_url_is_in_no_log_line(data_dir, postgres_database, where):
    secret = "s3cret-Pa55"
    url = (postgres_database.replace("postgres@", f"postgres:{secret}@") if where == "user"
           else f"{postgres_database}&password={secret}&application_name=analytics")
    run_processor_once(data_dir, DATABASE_URL=url)
    log = (data_dir / "processor.log").read_text()
    assert "processor started" in log
    assert secret not in log
