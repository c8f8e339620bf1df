"""The contract every queue and store keeps, run on each combination with the real services."""
import random
from datetime import date, timedelta

import pytest

from events import encode_event, validate_event
from processor import Processor
from reports import Period
from shared_queue import QueueUnavailable, open_queue
from store import StoreUnavailable, open_store

ALL_BACKENDS = True
FIRST_DAY = date(2025, 3, 1)
CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0 Safari/537.36"
IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
          "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1")


def generated_lines(count, seed=11):
    """Events as both APIs queue them: user ids, visitors, props, engagement, no path."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        day = FIRST_DAY + timedelta(days=rng.randrange(4))
        event = validate_event({
            "site_id": rng.choice(["big", "big", "small"]),
            "event_type": rng.choice(["page_view"] * 5 + ["click", "Signup", "engagement"]),
            "path": rng.choice([None, "/", "/a", "/B", "/é"]),
            "user_id": rng.choice([None, None] + [f"u{n}" for n in range(15)]),
            "timestamp": f"{day.isoformat()}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:00Z"})
        if event["user_id"] is None:
            event.update(visitor_id=f"v{rng.randrange(10)}", ua=rng.choice([CHROME, IPHONE]),
                         referrer=rng.choice([None, "https://news.test/x", "https://big/y"]),
                         query=rng.choice([None, "utm_source=mail&utm_campaign=spring"]),
                         props=rng.choice([None, {"plan": rng.choice(["pro", "free"])}]))
        lines.append(encode_event(event))
    return lines


def processor_for(config, batch_size=37):
    settings = config.with_overrides(processor_batch_size=batch_size)
    processor = Processor(open_queue(settings), open_store(settings), settings)
    processor.start()
    return processor


@pytest.fixture
def loaded(config):
    lines = generated_lines(1500)
    open_queue(config).append(lines)
    processor_for(config).run(once=True)
    store = open_store(config)
    connection = store.connect(readonly=True)
    yield store.reports(connection), store.reports(connection, raw=True)
    connection.close()
    store.close()


PERIODS = [Period(), Period(FIRST_DAY, FIRST_DAY), Period(FIRST_DAY, FIRST_DAY + timedelta(days=2))]


def test_every_report_from_rollups_equals_raw_events(loaded):
    rollup, raw = loaded
    for site in ("big", "small", "absent"):
        for period in PERIODS:
            assert rollup.stats(site, period, 3) == raw.stats(site, period, 3)
            for prop in ("path", "event_type", "source", "utm_campaign", "browser", "device",
                         "props.plan"):
                assert rollup.breakdown(site, prop, period, 4) == raw.breakdown(site, prop, period, 4)
            if not period.all_time:
                for interval in ("day", "hour"):
                    assert rollup.timeseries(site, period, interval) == raw.timeseries(site, period, interval)
    assert rollup.stats("big", Period())["total_views"] > 0


def test_an_event_delivered_twice_is_stored_once(config):
    lines = generated_lines(40, seed=3)
    queue = open_queue(config)
    queue.append(lines)
    queue.append(lines[:10])                       # a redelivery of the same accepted events
    processor_for(config).run(once=True)
    store = open_store(config)
    connection = store.connect(readonly=True)
    stored = connection.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
    counted = store.reports(connection).breakdown("big", "event_type", Period(), 100)
    raw = store.reports(connection, raw=True).breakdown("big", "event_type", Period(), 100)
    connection.close()
    store.close()
    assert tuple(stored) == (40, 40)
    assert counted == raw


def test_queue_size_counts_what_is_not_yet_stored(config):
    queue = open_queue(config)
    queue.append(generated_lines(25))
    assert queue.size() == 25
    processor = processor_for(config, batch_size=10)
    processor.step()
    assert queue.size() == 15
    processor.run(once=True)
    assert queue.size() == 0


def test_a_batch_that_failed_to_store_is_stored_later_not_lost(config):
    open_queue(config).append(generated_lines(30))
    processor = processor_for(config, batch_size=10)
    real_write = processor.store.write

    def failing_write(rows, name, checkpoint):
        raise StoreUnavailable("database went away")
    processor.store.write = failing_write
    with pytest.raises(StoreUnavailable):
        processor.step()
    processor.store.write = real_write
    processor.run(once=True)
    store = open_store(config)
    connection = store.connect(readonly=True)
    assert connection.execute("SELECT count(*) FROM events").fetchone()[0] == 30
    connection.close()
    store.close()


def test_schema_migrations_are_idempotent(config):
    store = open_store(config)
    assert store.migrate() == store.migrate()
    store.close()


def test_salts_are_shared_through_the_store(config):
    store = open_store(config)
    store.migrate()
    first = store.daily_salt("2025-01-02", b"a" * 32, forget_before="2025-01-01")
    assert store.daily_salt("2025-01-02", b"b" * 32, forget_before="2025-01-01") == first == b"a" * 32
    store.close()


def test_an_unreachable_queue_answers_503_and_health_says_unhealthy(config):
    from ingestion_api import create_app
    if config.queue_path.startswith("redis://"):
        broken = config.with_overrides(queue_url="redis://127.0.0.1:1/0?stream=nowhere")
    else:
        broken = config.with_overrides(queue_url="/nonexistent/dir/event_queue.jsonl")
    client = create_app(broken).test_client()
    response = client.post("/event", json={"site_id": "s", "event_type": "page_view"})
    assert response.status_code == 503 and "error" in response.get_json()
    health = client.get("/health")
    assert health.status_code == 503 and health.get_json()["status"] == "unhealthy"
    with pytest.raises(QueueUnavailable):
        open_queue(broken).append([b"{}\n"])
