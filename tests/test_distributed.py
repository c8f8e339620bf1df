"""Redis and PostgreSQL with real processes: processors killed with kill -9, Redis and PostgreSQL restarted.

Clients post events with unique user_id values through gunicorn while things break; afterwards
every event acknowledged with a 200 must be stored exactly once (counted by user_id in the store),
nothing stored may be an event that was never sent, and the rollups behind /stats must agree with
the events table.

Two processors on one SQLite database are not supported (SQLite has one writer), so Redis+SQLite
is tested with one processor.
"""
import random
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date

import orjson
import psycopg
import pytest
import redis
import requests
from redis.backoff import NoBackoff
from redis.retry import Retry

from config import load_config
from events import encode_event, validate_event
from postgres_store import PostgresStore
from processor import Processor
from processes import (
    Api, Load, duplicated_user_ids, free_port, log_tail, start_processor, stop, stored_count,
    stored_user_ids, wait_for)
from redis_queue import GROUP, RedisQueue
from reports import Period
from shared_queue import QueueUnavailable, open_queue
from store import open_store

CLAIM_IDLE = 1          # seconds before a live processor takes over a dead one's entries
PG_CLUSTER = ("15", "main")


# -- looking at the store and the queue directly ------------------------------

class PostgresEvents:
    """The events table of one PostgreSQL schema, read with a connection of our own."""

    def __init__(self, url):
        self.url = url

    def rows(self, sql):
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as connection:
            return connection.execute(sql).fetchall()

    def count(self):
        return self.rows("SELECT count(*) FROM events")[0][0]

    def duplicated_user_ids(self):
        return self.rows("SELECT user_id, count(*) FROM events GROUP BY user_id "
                         "HAVING count(*) > 1 LIMIT 20")

    def user_ids(self):
        return {user_id for (user_id,) in self.rows("SELECT user_id FROM events")}

    def writers_waiting(self):
        """Transactions waiting for a lock on the events table."""
        return self.rows("SELECT count(*) FROM pg_locks WHERE relation = 'events'::regclass "
                         "AND NOT granted")[0][0]


class SQLiteEvents:
    """The same questions of DATA_DIR/analytics.db."""

    def __init__(self, data_dir):
        self.data_dir = data_dir

    def count(self):
        return stored_count(self.data_dir)

    def duplicated_user_ids(self):
        return duplicated_user_ids(self.data_dir)

    def user_ids(self):
        return stored_user_ids(self.data_dir)


def assert_exactly_once(events, acknowledged, failed):
    """Every acknowledged id stored once; nothing stored that was never sent."""
    assert events.duplicated_user_ids() == [], "events stored more than once"
    stored = events.user_ids()
    lost = acknowledged - stored
    assert not lost, f"{len(lost)} acknowledged events lost, e.g. {sorted(lost)[:5]}"
    unknown = stored - acknowledged - failed
    assert not unknown, f"{len(unknown)} stored events were never sent, e.g. {sorted(unknown)[:5]}"
    return stored


def assert_rollups_exact(database_url, api, site_id, stored):
    """/stats and every rollup report equal the same reports over the events table."""
    stats = api.stats(site_id)
    assert stats["total_views"] == stored, f"/stats counts {stats['total_views']} views of {stored}"
    assert stats["unique_users"] == stored
    store = PostgresStore(database_url)
    connection = store.connect()
    try:
        rollup, raw = store.reports(connection), store.reports(connection, raw=True)
        first, last = connection.execute("SELECT min(timestamp), max(timestamp) FROM events").fetchone()
        days = Period(date.fromisoformat(first[:10]), date.fromisoformat(last[:10]))
        for period in (Period(), days):
            assert rollup.stats(site_id, period, 25) == raw.stats(site_id, period, 25)
            assert (rollup.breakdown(site_id, "path", period, 25)
                    == raw.breakdown(site_id, "path", period, 25))
        assert rollup.timeseries(site_id, days, "hour") == raw.timeseries(site_id, days, "hour")
    finally:
        connection.close()
        store.close()


def wait_until_drained(queue, timeout=90):
    """Nothing left in the stream that no processor has acknowledged."""
    wait_for(lambda: queue.size() == 0, timeout, "the processors did not drain the stream", 0.1)


def consumer_name(process):
    """The name a processor reads under in the consumer group (see RedisConsumer)."""
    return f"{socket.gethostname()}-{process.pid}"


def pending_of(queue, process):
    """Entries the processor has read and not acknowledged (none before the group exists)."""
    try:
        return len(queue.client.xpending_range(queue.stream, GROUP, min="-", max="+", count=100_000,
                                               consumername=consumer_name(process)))
    except redis.ResponseError as error:
        if "NOGROUP" in str(error):
            return 0
        raise


def processor_settings(queue_url, database_url=None, **extra):
    settings = {"QUEUE_URL": queue_url, "QUEUE_CLAIM_IDLE": CLAIM_IDLE, **extra}
    if database_url:
        settings["DATABASE_URL"] = database_url
    return settings


def start_processors(data_dir, children, count, **settings):
    """count processors, each logging to logs/processor-<n>.err, up and reading once this returns."""
    processors = [start_processor(data_dir, log_name=f"processor-{slot}", **settings)
                  for slot in range(count)]
    children.extend(processors)
    for slot, process in enumerate(processors):
        wait_for(lambda: "processor started" in log_tail(data_dir, f"processor-{slot}", 100_000)
                 or process.poll() is not None, 30, f"processor {slot} did not start")
        assert process.poll() is None, log_tail(data_dir, f"processor-{slot}")
    return processors


def failures_logged(data_dir, log_name):
    return log_tail(data_dir, log_name, size=10_000_000).count("batch failed; retrying")


# -- kill -9 of two processors sharing Redis and PostgreSQL ---------------------

def test_two_processors_killed_10_times_under_load_store_every_event_exactly_once(
        data_dir, children, redis_stream, postgres_database):
    settings = processor_settings(redis_stream, postgres_database)
    api = Api(data_dir, workers=2, **settings)
    children.append(api)
    queue, events = RedisQueue(redis_stream), PostgresEvents(postgres_database)
    rng = random.Random(11)
    batch_sizes = [500, 50, 2000, 7, 10_000]

    def start(slot, number):
        process = start_processor(data_dir, log_name=f"processor-{slot}", **settings,
                                  PROCESSOR_BATCH_SIZE=batch_sizes[number % len(batch_sizes)])
        children.append(process)
        return process

    processors = [start(0, 0), start(1, 1)]
    load = Load(api.url, "killed", threads=4, max_events=60_000, max_seconds=100, max_batch=20)
    left_pending = []
    try:
        for kill in range(10):
            slot = rng.randrange(2)
            victim = processors[slot]
            if kill % 2 == 0:
                # in the middle of a batch: it has read entries and not acknowledged them
                wait_for(lambda: pending_of(queue, victim) > 0 or victim.poll() is not None, 30,
                         f"processor {slot} never held a batch (kill {kill})", interval=0.002)
            else:
                before = events.count()
                wait_for(lambda: events.count() > before or victim.poll() is not None, 30,
                         f"no progress before kill {kill}")
                time.sleep(rng.uniform(0, 1))     # a random instant, not a wait for work
            assert victim.poll() is None, (f"processor {slot} exited with {victim.returncode}:\n"
                                           + log_tail(data_dir, f"processor-{slot}"))
            victim.kill()
            victim.wait(10)
            left_pending.append(pending_of(queue, victim))
            processors[slot] = start(slot, kill + 2)
        assert load.running(), "the load ended before the last kill"
    finally:
        acknowledged, failed = load.stop()

    wait_until_drained(queue)
    for slot, process in enumerate(processors):
        assert stop(process, signal.SIGTERM) == 0, log_tail(data_dir, f"processor-{slot}")
    assert not failed, f"{len(failed)} events were refused while only processors were killed"
    assert len(acknowledged) > 3000, "too little load to mean anything"
    assert sum(count > 0 for count in left_pending) >= 5, \
        f"too few kills left entries for the other processor to claim: {left_pending}"
    stored = assert_exactly_once(events, acknowledged, failed)
    assert events.count() == len(stored) == len(acknowledged)
    assert_rollups_exact(postgres_database, api, "killed", len(stored))


# -- Redis restarted under load -------------------------------------------------

class RedisServer:
    """A redis-server of the test's own that writes every change to its AOF before answering."""

    PORT_WAIT = 10      # seconds a restart waits for its port, held by another process meanwhile

    def __init__(self, directory, *options):
        self.directory = directory
        self.options = options
        self.port = None        # a free one at the first start; the same after, as clients hold the URL
        self.process = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        """On a free port the first time (another one if that is taken before Redis binds it, as Api
        does); on the same port after that, waiting a while for another process to let it go."""
        if self.port is None:
            for _ in range(3):
                self.port = free_port()
                if self._started():
                    return
            raise AssertionError("redis did not start: three free ports were taken before it bound them")
        deadline = time.monotonic() + self.PORT_WAIT
        while not self._started():
            if time.monotonic() > deadline:
                raise AssertionError(f"redis did not restart: another process has held its port {self.port}, "
                                     f"which its clients' URLs name, for {self.PORT_WAIT}s")
            time.sleep(0.2)

    def _started(self):
        """Start redis-server: True once it answers, False if its port is taken; fails otherwise."""
        log_path = self.directory / "redis.log"
        with open(log_path, "ab") as log:
            written = log.tell()
            self.process = subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
                 "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", "always",
                 "--save", "", *self.options],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        wait_for(lambda: self.answers() or self.process.poll() is not None, 15, "redis did not start")
        if self.process.poll() is None:
            return True
        with open(log_path, "rb") as log:
            log.seek(written)
            said = log.read().decode(errors="replace")
        assert "Address already in use" in said, f"redis did not start:\n{said[-2000:]}"
        return False

    def answers(self):
        """Whether this server answers on its port: not another one that holds the port."""
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1,
                             retry=Retry(NoBackoff(), 0))
        try:
            return client.info("server")["process_id"] == self.process.pid
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self):
        """SIGTERM: Redis writes what it has and exits 0."""
        return stop(self.process, signal.SIGTERM, timeout=30)


@pytest.fixture
def own_redis(tmp_path):
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    yield server
    stop(server.process)


def assert_refuses_events_while_redis_is_down(api, probes):
    """/health says unhealthy and POST /event answers a JSON 503: never 200 for an unqueued event."""
    health = requests.get(api.url + "/health", timeout=60)
    assert health.status_code == 503, health.text
    assert health.json()["status"] == "unhealthy"
    for _ in range(2):
        user_id = f"probe-{len(probes)}"
        probes.add(user_id)
        response = requests.post(api.url + "/event", timeout=60, json={
            "site_id": "restarted", "event_type": "page_view", "path": "/", "user_id": user_id})
        assert response.status_code == 503, response.text
        assert response.headers["Content-Type"] == "application/json"
        assert "error" in response.json()


def health_status(api):
    try:
        return requests.get(api.url + "/health", timeout=60).status_code
    except requests.RequestException:
        return None


def test_a_redis_restart_under_load_loses_no_acknowledged_event(
        data_dir, children, own_redis, postgres_database):
    queue_url = f"{own_redis.url}?stream=analytics-test:restart"
    settings = processor_settings(queue_url, postgres_database)
    api = Api(data_dir, workers=2, **settings)
    children.append(api)
    processors = start_processors(data_dir, children, 2, PROCESSOR_BATCH_SIZE=500, **settings)
    queue, events = RedisQueue(queue_url), PostgresEvents(postgres_database)
    probes = set()
    load = Load(api.url, "restarted", threads=4, max_events=60_000, max_seconds=100, max_batch=20)
    try:
        for restart in range(2):
            acked = load.acked_so_far
            wait_for(lambda: load.acked_so_far > acked + 1500, 30, f"no load before restart {restart}")
            # stop while something is queued and not yet stored
            wait_for(lambda: queue.size() > 0, 30, "the stream never held a backlog", interval=0.002)
            assert own_redis.stop() == 0
            assert_refuses_events_while_redis_is_down(api, probes)
            for slot in range(2):
                wait_for(lambda: failures_logged(data_dir, f"processor-{slot}") > restart, 30,
                         f"processor {slot} did not notice that Redis is down")
            own_redis.start()
            wait_for(lambda: health_status(api) == 200, 60,
                     "/health did not recover after Redis came back")
            acked = load.acked_so_far
            wait_for(lambda: load.acked_so_far > acked + 1500, 60,
                     "clients got no 200s after Redis came back")
        assert load.running(), "the load ended before the last restart"
    finally:
        acknowledged, failed = load.stop()

    wait_until_drained(queue)
    for slot, process in enumerate(processors):
        assert process.poll() is None, \
            f"processor {slot} exited:\n" + log_tail(data_dir, f"processor-{slot}")
    assert failed, "no client saw Redis down: the outage was not under load"
    assert len(acknowledged) > 3000, "too little load to mean anything"
    stored = assert_exactly_once(events, acknowledged, failed)
    assert not stored & probes, "an event refused with 503 while Redis was down was stored"
    assert_rollups_exact(postgres_database, api, "restarted", len(stored))


def test_a_processor_started_while_redis_is_down_waits_for_it(data_dir, children, own_redis):
    queue_url = f"{own_redis.url}?stream=analytics-test:late"
    assert own_redis.stop() == 0
    processor = start_processor(data_dir, **processor_settings(queue_url))
    children.append(processor)
    # twice: it noticed, and it is still trying rather than gone
    refused = f"connecting to 127.0.0.1:{own_redis.port}"
    wait_for(lambda: processor.poll() is not None
             or log_tail(data_dir, "processor", 1_000_000).count(refused) >= 2,
             30, "the processor neither failed nor retried")
    assert processor.poll() is None, \
        "the processor exited because Redis was down when it started:\n" + log_tail(data_dir, "processor")

    own_redis.start()
    queue = RedisQueue(queue_url)
    queued = {f"late-{n}" for n in range(100)}
    queue.append([encode_event(validate_event(
        {"site_id": "late", "event_type": "page_view", "user_id": user_id})) for user_id in sorted(queued)])
    wait_for(lambda: stored_count(data_dir) == len(queued), 60,
             "the processor did not store after Redis came back")
    wait_until_drained(queue)
    assert_exactly_once(SQLiteEvents(data_dir), queued, set())


def test_threads_appending_first_to_a_fresh_redis_queue_all_succeed(redis_stream):
    """What every gthread worker does with its first requests: its threads share one queue."""
    line = encode_event(validate_event({"site_id": "threads", "event_type": "page_view"}))
    errors = []
    for _ in range(400):
        queue = RedisQueue(redis_stream)
        start = threading.Barrier(16)

        def append(queue=queue, start=start):
            start.wait()
            try:
                queue.append([line])
            except Exception as error:      # QueueUnavailable would be a 503; anything else is a 500
                errors.append(error)

        threads = [threading.Thread(target=append) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        queue.close()
        if errors:
            break
    assert not errors, f"appends failed with Redis up: {errors}"


# -- PostgreSQL restarted under load ----------------------------------------------

def postgres_is_ready():
    return subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"]).returncode == 0


def restart_postgres():
    version, cluster = PG_CLUSTER
    done = subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "restart"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"pg_ctlcluster restart failed: {done.stderr}"


def status_codes(api, path, count=40):
    """The answers to count GET requests sent four at a time, so that every worker thread gets some."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda _: requests.get(api.url + path, timeout=60).status_code,
                             range(count)))


def test_a_postgres_restart_under_load_loses_nothing(data_dir, children, redis_stream, postgres_database):
    settings = processor_settings(redis_stream, postgres_database)
    api = Api(data_dir, workers=2, **settings)
    children.append(api)
    processors = start_processors(data_dir, children, 2, PROCESSOR_BATCH_SIZE=500, **settings)
    queue, events = RedisQueue(redis_stream), PostgresEvents(postgres_database)
    load = Load(api.url, "pgrestart", threads=4, max_events=60_000, max_seconds=100, max_batch=20)
    try:
        try:
            wait_for(lambda: events.count() > 1000, 30, "nothing stored before the restart")
            # every API worker and thread now holds pooled connections to the database
            assert set(status_codes(api, "/stats?site_id=pgrestart")) == {200}
            # A processor between batches, or one asking the pool for a connection while the server
            # is down, gets a new one once it is back without a word: only a batch under way when
            # the server stops fails (and is retried). Hold one there, as the restart comes.
            holder = psycopg.connect(postgres_database, autocommit=True)
            try:
                holder.execute("BEGIN")
                holder.execute("LOCK TABLE events IN SHARE MODE")      # no INSERT gets past it
                wait_for(events.writers_waiting, 30, "no processor was storing a batch")
                restart_postgres()
            finally:
                holder.close()
            wait_for(lambda: sum(failures_logged(data_dir, f"processor-{slot}") for slot in range(2)),
                     30, "no processor retried the batch the restart broke")
            before = events.count()
            wait_for(lambda: events.count() > before + 1000, 60,
                     "the processors did not store again after PostgreSQL came back")
            assert load.running(), "the load ended before the processors recovered"
            codes_after = status_codes(api, "/stats?site_id=pgrestart")
        finally:
            acknowledged, failed = load.stop()
        wait_until_drained(queue)
        for slot, process in enumerate(processors):
            assert process.poll() is None, \
                f"processor {slot} exited:\n" + log_tail(data_dir, f"processor-{slot}")
            assert stop(process, signal.SIGTERM) == 0
        assert not failed, f"{len(failed)} events were refused while only PostgreSQL was down"
        stored = assert_exactly_once(events, acknowledged, failed)
        assert len(stored) == len(acknowledged)
        assert_rollups_exact(postgres_database, api, "pgrestart", len(stored))
        # the API's pooled connections died with the restart: none may turn into a 503 later
        assert set(codes_after) == {200}, f"/stats answered {codes_after} once PostgreSQL was back"
    finally:
        deadline = time.monotonic() + 60
        while not postgres_is_ready() and time.monotonic() < deadline:
            time.sleep(0.5)


# -- Redis and SQLite: one processor -------------------------------------------------

def test_one_processor_on_redis_and_sqlite_killed_and_restarted_stores_exactly_once(
        data_dir, children, redis_stream):
    settings = processor_settings(redis_stream)
    api = Api(data_dir, workers=2, **settings)
    children.append(api)
    queue, events = RedisQueue(redis_stream), SQLiteEvents(data_dir)
    rng = random.Random(5)
    load = Load(api.url, "sqlite", threads=4, max_events=60_000, max_seconds=60, max_batch=20)
    left_pending = []
    try:
        for kill in range(4):
            # a batch may be stored between seeing it held and the kill: then kill the next one
            for _ in range(5):
                processor = start_processor(data_dir, PROCESSOR_BATCH_SIZE=300, **settings)
                children.append(processor)
                if kill % 2 == 0:
                    # in the middle of a batch, which the next processor has to claim
                    wait_for(lambda: pending_of(queue, processor) > 0 or processor.poll() is not None, 30,
                             f"the processor never held a batch (kill {kill})", interval=0.002)
                elif kill == 1:
                    before = events.count()
                    wait_for(lambda: events.count() > before or processor.poll() is not None, 30,
                             "the processor stored nothing")
                    time.sleep(rng.uniform(0, 1))       # a random instant, not a wait for work
                else:
                    time.sleep(rng.uniform(0, 0.5))     # somewhere in its start-up
                assert processor.poll() is None, log_tail(data_dir, "processor")
                processor.kill()
                processor.wait(10)
                pending = pending_of(queue, processor)
                if kill % 2 or pending:
                    break
            left_pending.append(pending)
        processor = start_processor(data_dir, PROCESSOR_BATCH_SIZE=300, **settings)
        children.append(processor)
        acked = load.acked_so_far
        wait_for(lambda: load.acked_so_far > acked + 500, 30, "no load after the last restart")
    finally:
        acknowledged, failed = load.stop()

    wait_until_drained(queue)
    assert stop(processor, signal.SIGTERM) == 0, log_tail(data_dir, "processor")
    assert left_pending[0] and left_pending[2], f"a kill left nothing to claim: {left_pending}"
    assert not failed, f"{len(failed)} events were refused while only the processor was killed"
    assert len(acknowledged) > 2000, "too little load to mean anything"
    stored = assert_exactly_once(events, acknowledged, failed)
    assert events.count() == len(stored) == len(acknowledged)
    assert api.stats("sqlite")["total_views"] == len(stored)


# -- the stream stays bounded ---------------------------------------------------------

def test_the_stream_is_trimmed_once_drained_by_processors_that_restart_before_many_events(
        data_dir, children, redis_stream, postgres_database):
    settings = processor_settings(redis_stream, postgres_database)
    queue, events = RedisQueue(redis_stream), PostgresEvents(postgres_database)
    sent = 0
    for restart in range(3):
        processors = start_processors(data_dir, children, 2, PROCESSOR_BATCH_SIZE=100, **settings)
        queue.append([encode_event(validate_event({"site_id": "trimmed", "event_type": "page_view",
                                                   "user_id": f"trimmed-{sent + n}"})) for n in range(2000)])
        sent += 2000
        wait_until_drained(queue)
        wait_for(lambda: events.count() == sent, 30, "the processors did not store every event")
        wait_for(lambda: queue.client.xlen(queue.stream) <= 1, 30,
                 f"the stream still holds {queue.client.xlen(queue.stream)} stored entries (restart {restart})")
        for slot, process in enumerate(processors):
            assert stop(process, signal.SIGTERM) == 0, log_tail(data_dir, f"processor-{slot}")
    assert_exactly_once(events, {f"trimmed-{n}" for n in range(sent)}, set())


# -- Redis at maxmemory --------------------------------------------------------------

@pytest.fixture
def full_redis(tmp_path):
    """A redis-server of the test's own that refuses writes past 2 MB, as maxmemory does."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory, "--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    server.start()
    yield server
    stop(server.process)


class Filler:
    """Clients that go on sending while Redis is full, as they do: whatever memory frees up, they take."""

    def __init__(self, queue, site_id):
        self.queue, self.site_id = queue, site_id
        self.queued, self.refused = set(), 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping.is_set():
            user_id = f"{self.site_id}-{len(self.queued) + self.refused}"
            try:
                self.queue.append([encode_event(validate_event(
                    {"site_id": self.site_id, "event_type": "page_view", "user_id": user_id}))])
                self.queued.add(user_id)
            except QueueUnavailable:
                self.refused += 1

    def stop(self):
        self.stopping.set()
        self.thread.join(30)
        return self.queued


def test_a_processor_started_while_redis_is_full_drains_it(data_dir, children, full_redis, postgres_database):
    queue_url = f"{full_redis.url}?stream=analytics-test:full"
    queue, events = RedisQueue(queue_url), PostgresEvents(postgres_database)
    queue.consumer()                      # the group, as a processor that ran before left it
    filler = Filler(RedisQueue(queue_url), "full")
    try:
        wait_for(lambda: filler.refused, 60, "Redis never became full")
        start_processors(data_dir, children, 1, **processor_settings(queue_url, postgres_database))
    finally:
        queued = filler.stop()
    wait_until_drained(queue)
    wait_for(lambda: events.count() == len(queued), 30, "the processor did not store the backlog")
    assert_exactly_once(events, queued, set())


def unhealthy(api):
    response = requests.get(api.url + "/health", timeout=30)
    return response.json() if response.status_code == 503 else None


def test_health_says_unhealthy_while_redis_is_full_and_events_are_refused(data_dir, children, full_redis):
    queue_url = f"{full_redis.url}?stream=analytics-test:full"
    api = Api(data_dir, workers=1, QUEUE_URL=queue_url)
    children.append(api)
    filler = Filler(RedisQueue(queue_url), "full")
    try:
        wait_for(lambda: filler.refused, 60, "Redis never became full")
        response = requests.post(api.url + "/event", timeout=30,
                                 json={"site_id": "full", "event_type": "page_view", "user_id": "probe"})
        assert response.status_code == 503, response.text
        health = wait_for(lambda: unhealthy(api), 10, "/health said healthy while Redis refused every event")
        assert "maxmemory" in health["reason"]
    finally:
        filler.stop()


def test_a_processor_warns_at_start_when_redis_may_evict_the_stream(data_dir, children, tmp_path):
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory, "--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru")
    server.start()
    try:
        start_processors(data_dir, children, 1, **processor_settings(f"{server.url}?stream=analytics-test:lru"))
        assert "maxmemory-policy is allkeys-lru; set it to noeviction" in log_tail(data_dir, "processor-0")
    finally:
        stop(server.process)


def test_redis_going_down_before_a_stored_batch_is_acknowledged_is_logged_as_an_outage(own_redis):
    """One warning line, as for any read while Redis is down, not an error with a traceback."""
    queue_url = f"{own_redis.url}?stream=analytics-test:ack"
    queue = RedisQueue(queue_url)
    queue.append([encode_event(validate_event({"site_id": "ack", "event_type": "page_view"}))])
    consumer = queue.consumer()
    batch = consumer.read(10)
    assert own_redis.stop() == 0
    with pytest.raises(QueueUnavailable, match="cannot reach Redis"):
        consumer.acknowledge(batch)


def test_a_batch_stored_but_not_acknowledged_when_redis_went_down_writes_its_dead_letters_once(
        own_redis, data_dir):
    """Read again from its pending entries once Redis is back, the batch's events are stored once
    (by id), and its invalid line must not go to the dead-letter file a second time."""
    config = load_config(environ={}, data_dir=str(data_dir),
                         queue_url=f"{own_redis.url}?stream=analytics-test:letters")
    queue = RedisQueue(config.queue_url)
    queue.append([encode_event(validate_event({"site_id": "letters", "event_type": "page_view",
                                               "user_id": "u1"})), b"not json\n"])
    processor = Processor(queue, open_store(config), config)
    processor.start()
    store_write = processor.store.write

    def write_then_lose_redis(*args):
        store_write(*args)
        assert own_redis.stop() == 0
    processor.store.write = write_then_lose_redis
    with pytest.raises(QueueUnavailable):
        processor.step()
    processor.store.write = store_write
    own_redis.start()
    processor.run(once=True)
    with open(config.dead_letter_path, "rb") as file:
        assert [orjson.loads(line)["line"] for line in file] == ["not json"]
    assert processor.dead == 1
    assert stored_user_ids(data_dir) == {"u1"}


def test_once_waits_for_what_a_processor_that_died_left_unacknowledged_and_stores_it(data_dir, redis_stream):
    """--once drains the queue: a dead processor's entries included, taken over after QUEUE_CLAIM_IDLE."""
    config = load_config(environ={}, data_dir=str(data_dir), queue_url=redis_stream, claim_idle=1.0)
    queue = RedisQueue(redis_stream)
    def events(prefix, count):
        return [encode_event(validate_event({"site_id": "once", "event_type": "page_view",
                                             "user_id": f"{prefix}-{n}"})) for n in range(count)]
    queue.append(events("held", 300))
    queue.client.xgroup_create(queue.stream, GROUP, id="0", mkstream=True)
    queue.client.xreadgroup(GROUP, "a-processor-killed-mid-batch", {queue.stream: ">"}, count=300)
    queue.append(events("new", 200))

    processor = Processor(open_queue(config), open_store(config), config)
    processor.start()
    processor.run(once=True)

    assert queue.size() == 0
    assert_exactly_once(SQLiteEvents(data_dir), {f"held-{n}" for n in range(300)}
                        | {f"new-{n}" for n in range(200)}, set())
