"""The PostgreSQL store through PgBouncer in transaction pooling mode, as managed PostgreSQL offers it.

PgBouncer hands each transaction whichever server connection is free, so nothing may outlive
a transaction on a server connection: session locks, SET, LISTEN, server-side prepared
statements (PgBouncer before 1.21 does not carry them over to the next server connection).
"""
import io
import os
import shutil
import subprocess
from collections import Counter

import orjson
import psycopg
import pytest

from config import load_config
from ingestion_api import create_app
from processes import free_port, wait_for
from processor import Processor
from reports import Period
from shared_queue import open_queue
from store import open_store
from transfer import export_events

PGBOUNCER = shutil.which("pgbouncer", path=f"{os.environ.get('PATH', '')}:/usr/sbin")


def accepts_connections(url):
    try:
        psycopg.connect(url, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


@pytest.fixture
def pgbouncer(tmp_path, postgres_database):
    """A PgBouncer of its own, in transaction mode, before the test's schema; yields its URL."""
    if PGBOUNCER is None:
        pytest.skip("PgBouncer is not installed: run .ci/provision-pgbouncer (apt-get install pgbouncer) "
                    "to enable")
    # PgBouncer 1.18 refuses the options startup parameter that the schema's URL uses: it sets
    # the search path on each server connection itself
    schema = psycopg.conninfo.conninfo_to_dict(postgres_database)["options"].split("=")[1]
    port = free_port()
    (tmp_path / "pgbouncer-users.txt").write_text('"postgres" ""\n')     # trust still wants the user listed
    (tmp_path / "pgbouncer.ini").write_text(f"""
[databases]
analytics = host=127.0.0.1 port=5432 dbname=test connect_query='SET search_path TO {schema}'
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {tmp_path / "pgbouncer-users.txt"}
pool_mode = transaction
""")
    # it refuses to run as root; -u makes it drop to another user once it read its files
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    with open(tmp_path / "pgbouncer.log", "wb") as log:
        process = subprocess.Popen([PGBOUNCER, *user, str(tmp_path / "pgbouncer.ini")],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    url = f"postgresql://postgres@127.0.0.1:{port}/analytics"
    try:
        wait_for(lambda: accepts_connections(url) or process.poll() is not None, 10, "PgBouncer to start")
        assert process.poll() is None, (tmp_path / "pgbouncer.log").read_text()
        yield url
    finally:
        process.terminate()
        process.wait()


@pytest.mark.parametrize("queue", ["file", "redis"])
def test_processor_and_reports_work_through_pgbouncer_in_transaction_mode(tmp_path, pgbouncer, queue, request):
    queue_url = request.getfixturevalue("redis_stream") if queue == "redis" else ""
    config = load_config(environ={}, data_dir=str(tmp_path), database_url=pgbouncer, queue_url=queue_url,
                         processor_batch_size=4)
    app = create_app(config)
    client = app.test_client()
    processor = Processor(open_queue(config), open_store(config), config)
    processor.start()
    # every statement runs more often than psycopg's threshold for preparing it (5), the processor
    # and the reports taking turns on PgBouncer's server connections
    for turn in range(1, 9):
        for number in range(8):
            event = {"site_id": "s", "event_type": "page_view", "path": f"/p{number % 2}", "user_id": f"u{number}"}
            assert client.post("/event", json=event).status_code == 200
        while processor.step():
            pass
        response = client.get("/stats?site_id=s")
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["total_views"] == 8 * turn
        assert response.get_json()["unique_users"] == 8
        assert client.get("/stats/breakdown?site_id=s&property=path").get_json()["results"] == [
            {"value": "/p0", "views": 4 * turn, "events": 4 * turn, "unique_users": 4},
            {"value": "/p1", "views": 4 * turn, "events": 4 * turn, "unique_users": 4}]
    processor.close()

    store = open_store(config)
    store.rebuild_rollups()
    assert client.get("/stats/breakdown?site_id=s&property=path").get_json()["results"] == [
        {"value": "/p0", "views": 32, "events": 32, "unique_users": 4},
        {"value": "/p1", "views": 32, "events": 32, "unique_users": 4}]
    out = io.StringIO()
    assert export_events(store, out, "s", Period()) == 64
    assert Counter(orjson.loads(line)["path"] for line in out.getvalue().splitlines()) == {"/p0": 32, "/p1": 32}
    store.close()
    app.extensions["analytics"]["store"].close()
    app.extensions["analytics"]["queue"].close()
