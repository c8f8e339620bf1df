"""What only the PostgreSQL store has: databases whose collation is not C."""
import uuid

import psycopg
import pytest

from config import load_config
from conftest import POSTGRES
from ingestion_api import create_app
from processor import Processor
from reports import Period
from shared_queue import open_queue
from store import open_store


def signup(client, site, props):
    event = {"n": "Signup", "d": site, "u": f"http://{site}/pricing", "p": props}
    assert client.post("/api/event", json=event, headers={"User-Agent": "Mozilla/5.0 Firefox/140.0"},
                       environ_base={"REMOTE_ADDR": "203.0.113.7"}).status_code == 202


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
