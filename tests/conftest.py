import os
import uuid

import psycopg
import pytest
import redis

from config import load_config
from ingestion_api import create_app
from processes import Api, SmallDisk, stop
from processor import Processor
from shared_queue import open_queue
from store import open_store

# The services this machine runs; .ci/run starts them when they are not up.
POSTGRES = "postgresql://postgres@127.0.0.1:5432"
REDIS = "redis://127.0.0.1:6379/0"
BACKENDS = ("file+sqlite", "file+postgresql", "redis+sqlite", "redis+postgresql")


def pytest_configure(config):
    config.addinivalue_line("markers", "embedded: a test of the file queue or SQLite themselves")


def pytest_generate_tests(metafunc):
    """Modules with ALL_BACKENDS = True run every test on every queue and store."""
    if getattr(metafunc.module, "ALL_BACKENDS", False) and "config" in metafunc.fixturenames:
        embedded = metafunc.definition.get_closest_marker("embedded")
        metafunc.parametrize("backend", BACKENDS[:1] if embedded else BACKENDS)


@pytest.fixture
def backend():
    return "file+sqlite"


@pytest.fixture
def postgres_database():
    """A schema of its own in the test database, dropped afterwards; yields its URL."""
    schema = f"analytics_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{POSTGRES}/test", autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    yield f"{POSTGRES}/test?options=-csearch_path%3D{schema}"
    with psycopg.connect(f"{POSTGRES}/test", autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def redis_stream():
    """A stream key of its own, deleted afterwards; yields the queue URL."""
    stream = f"analytics-test:{uuid.uuid4().hex[:12]}"
    yield f"{REDIS}?stream={stream}"
    redis.Redis.from_url(REDIS).delete(stream)


@pytest.fixture
def config(tmp_path, backend, request):
    queue_kind, store_kind = backend.split("+")
    overrides = {"data_dir": str(tmp_path), "claim_idle": 0.5}
    if queue_kind == "redis":
        overrides["queue_url"] = request.getfixturevalue("redis_stream")
    if store_kind == "postgresql":
        overrides["database_url"] = request.getfixturevalue("postgres_database")
    return load_config(environ={}, **overrides)


@pytest.fixture
def app(config):
    app = create_app(config)
    yield app
    app.extensions["analytics"]["store"].close()
    app.extensions["analytics"]["queue"].close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def drain(config):
    """Run the processor in this process until the queue is empty; returns it."""
    def drain_queue(**overrides):
        settings = config.with_overrides(**overrides) if overrides else config
        processor = Processor(open_queue(settings), open_store(settings), settings)
        processor.start()
        processor.run(once=True)
        return processor
    return drain_queue


@pytest.fixture
def data_dir(tmp_path):
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def children():
    """Processes a test starts; all are killed (whole process groups) when it ends."""
    started = []
    yield started
    for child in reversed(started):
        stop(child.process if isinstance(child, Api) else child)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB file system of its own that the test fills up (small_disk.fill()) and frees."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is a tmpfs mounted for the test, which only root may mount: "
                    "run the tests as root (CI does) to enable")
    disk = SmallDisk(tmp_path / "disk")
    yield disk
    disk.unmount()
