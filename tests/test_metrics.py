"""GET /metrics: what ingestion, the queue and the processor count, after real requests."""
import gzip
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from events import encode_event, validate_event
from metrics import (FLUSH_EVERY, LATENCY_BUCKETS, PROCESSOR, ApiMetrics, ProcessorMetrics,
                     use_metrics_directory)
from processes import Api, log_tail, run_processor_once, start_processor, stored_count, wait_for
from processor import Processor
from shared_queue import FileQueue, open_queue
from store import StoreUnavailable, open_store
from test_queue import run_on_a_full_disk

EVENT = {"site_id": "s", "event_type": "page_view", "path": "/a"}
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
PAGEVIEW = b'{"n":"pageview","u":"http://example.test/a","d":"example.test","r":null}'


def samples(text):
    """{(sample name, frozenset of labels): value} of an exposition."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(metrics, name, **labels):
    return metrics.get((name, frozenset(labels.items())), 0.0)


def scrape(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    return samples(response.get_data(as_text=True))


def test_accepted_rejected_and_dropped_events_are_counted(client, config):
    for _ in range(3):
        assert client.post("/event", json=EVENT).status_code == 200
    assert client.post("/events", json=[EVENT] * 4).status_code == 200
    assert client.post("/event", data=b"nope").status_code == 400
    assert client.post("/event", data=b"x" * (config.max_body_bytes + 1)).status_code == 413
    assert client.post("/api/event", data=PAGEVIEW, headers={"User-Agent": GOOGLEBOT}).status_code == 202
    metrics = scrape(client)
    assert value(metrics, "analytics_events_accepted_total", endpoint="/event") == 3
    assert value(metrics, "analytics_events_accepted_total", endpoint="/events") == 4
    assert value(metrics, "analytics_requests_rejected_total", endpoint="/event", reason="invalid") == 1
    assert value(metrics, "analytics_requests_rejected_total", endpoint="/event", reason="too_large") == 1
    assert value(metrics, "analytics_events_dropped_total", reason="bot") == 1


def test_a_compressed_body_is_counted_as_invalid_since_error_is_for_server_errors(client):
    response = client.post("/event", data=gzip.compress(b"{}"), headers={"Content-Encoding": "gzip"})
    assert response.status_code == 415
    metrics = scrape(client)
    assert value(metrics, "analytics_requests_rejected_total", endpoint="/event", reason="invalid") == 1
    assert value(metrics, "analytics_requests_rejected_total", endpoint="/event", reason="error") == 0


def test_latency_is_a_histogram_per_endpoint(client):
    for _ in range(5):
        client.post("/event", json=EVENT)
    client.get("/health")
    metrics = scrape(client)
    assert value(metrics, "analytics_request_duration_seconds_count", endpoint="/event") == 5
    assert value(metrics, "analytics_request_duration_seconds_count", endpoint="/health") == 1
    assert value(metrics, "analytics_request_duration_seconds_bucket", endpoint="/event", le="+Inf") == 5


def latency_samples(registry):
    from prometheus_client import generate_latest
    return {key: count for key, count in samples(generate_latest(registry).decode()).items()
            if key[0].startswith("analytics_request_duration") and not key[0].endswith("_created")}


def test_counts_written_in_bulk_equal_one_observation_per_request(config):
    from prometheus_client import CollectorRegistry, Histogram
    metrics = ApiMetrics(config, open_queue(config))
    registry = CollectorRegistry()
    reference = Histogram("analytics_request_duration_seconds", "", ["endpoint"], buckets=LATENCY_BUCKETS,
                          registry=registry)
    durations = [0.0, 0.0004, 0.0005, 0.0007, 0.001, 0.3, 5.0, 9.0, 0.0005]   # bounds, between, past the last
    for seconds in durations:
        metrics.answered("/event", 200, seconds, ingest=True)
        reference.labels("/event").observe(seconds)
    metrics.flush()
    assert latency_samples(metrics.registry) == latency_samples(registry)
    assert value(latency_samples(registry), "analytics_request_duration_seconds_count", endpoint="/event") == 9


def test_counts_reach_the_metrics_within_the_flush_interval_without_a_scrape(config):
    from prometheus_client import generate_latest
    metrics = ApiMetrics(config, open_queue(config))
    metrics.events_accepted("/event", 7)
    wait_for(lambda: value(samples(generate_latest(metrics.registry).decode()),
                           "analytics_events_accepted_total", endpoint="/event") == 7,
             FLUSH_EVERY * 10, "the counts were never written")


@pytest.mark.embedded
def test_a_queue_that_cannot_be_read_leaves_its_gauges_out_and_the_rest_is_answered(client, config):
    assert client.post("/events", json=[EVENT] * 2).status_code == 200
    os.mkdir(f"{config.queue_path}.0")     # where the oldest event would be: no file can be read there
    metrics = scrape(client)
    assert value(metrics, "analytics_events_accepted_total", endpoint="/events") == 2
    assert ("analytics_queue_size", frozenset()) not in metrics


def test_queue_size_and_processor_lag_follow_the_queue(client, drain):
    metrics = scrape(client)
    assert value(metrics, "analytics_queue_size") == 0
    assert value(metrics, "analytics_processor_lag_seconds") == 0
    client.post("/events", json=[EVENT] * 6)
    metrics = scrape(client)
    assert value(metrics, "analytics_queue_size") == 6
    assert value(metrics, "analytics_processor_lag_seconds") > 0
    drain()
    metrics = scrape(client)
    assert value(metrics, "analytics_queue_size") == 0
    assert value(metrics, "analytics_processor_lag_seconds") == 0


def test_processor_reports_each_batch_size_and_duration(client, config):
    client.post("/events", json=[EVENT] * 7)
    batches = ProcessorMetrics()
    settings = config.with_overrides(processor_batch_size=3)
    processor = Processor(open_queue(settings), open_store(settings), settings,
                          on_batch=batches.batch_stored)
    processor.start()
    processor.run(once=True)
    assert batches.registry.get_sample_value("analytics_processor_batch_size_count") == 3
    assert batches.registry.get_sample_value("analytics_processor_batch_size_sum") == 7
    assert batches.registry.get_sample_value("analytics_processor_batch_duration_seconds_count") == 3


def test_processor_counts_the_lines_it_sends_to_the_dead_letter_file(config):
    queue = open_queue(config)
    queue.append([encode_event(validate_event(EVENT)), b"not json\n", b"[1]\n"])
    batches = ProcessorMetrics()
    processor = Processor(queue, open_store(config), config, on_batch=batches.batch_stored)
    processor.start()
    processor.run(once=True)
    assert batches.registry.get_sample_value("analytics_processor_dead_letters_total") == 2


def test_processor_counts_its_failed_batches_and_retention_windows(config):
    """What lasts (a user without DELETE, a bug) is otherwise in the log alone."""
    queue = open_queue(config)
    queue.append([encode_event(validate_event(EVENT))])
    counts = ProcessorMetrics()
    settings = config.with_overrides(retention_days=1, retention_interval=0.001)
    processor = Processor(queue, open_store(settings), settings, on_batch=counts.batch_stored,
                          on_failure=counts.failed)
    processor.start()
    store, failures = processor.store, []

    def fails_first(real):
        def call(*args):
            if real.__name__ not in failures:
                failures.append(real.__name__)
                raise StoreUnavailable("PostgreSQL: connection failed")
            return real(*args)
        return call
    store.write, store.delete_before = fails_first(store.write), fails_first(store.delete_before)
    processor.run(once=True)
    assert failures == ["write", "delete_before"]
    for stage in ("batch", "retention"):
        assert counts.registry.get_sample_value("analytics_processor_failures_total", {"stage": stage}) == 1


def test_metrics_off_means_no_endpoint(config):
    from ingestion_api import create_app
    client = create_app(config.with_overrides(metrics=False)).test_client()
    assert client.post("/event", json=EVENT).status_code == 200
    assert client.get("/metrics").status_code == 404


def test_a_starting_processor_keeps_the_metrics_of_processors_still_running(config, monkeypatch):
    directory = os.path.join(config.metrics_path, PROCESSOR)
    os.makedirs(directory)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for pid in (running.pid, gone.pid):
        open(os.path.join(directory, f"histogram_{pid}.db"), "wb").close()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")    # what use_metrics_directory sets is undone after
    try:
        use_metrics_directory(config, PROCESSOR)
        use_metrics_directory(config, PROCESSOR)      # a second processor starting beside it
    finally:
        running.kill()
        running.wait()
    assert os.listdir(directory) == [f"histogram_{running.pid}.db"]


def counting_workers(data_dir):
    """Worker pids that have written counters in the multiprocess directory."""
    return {path.name.split("_")[-1] for path in (data_dir / "metrics" / "api").iterdir()
            if path.name.startswith("counter_")}


def test_gunicorn_workers_and_the_processor_add_up_in_one_scrape(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # sync workers take one request at a time, so concurrent requests spread over them
    api = Api(data_dir, workers=3, GUNICORN_CMD_ARGS="-k sync")
    try:
        sent = 0
        with ThreadPoolExecutor(12) as pool:
            while len(counting_workers(data_dir)) < 2 and sent < 1200:
                answers = pool.map(lambda _: requests.post(api.url + "/event", json=EVENT).status_code,
                                   range(12))
                assert set(answers) == {200}
                sent += 12
        assert len(counting_workers(data_dir)) > 1, "all requests went to one worker: the sum proves nothing"
        assert requests.post(api.url + "/event", data=b"{").status_code == 400
        run_processor_once(data_dir, PROCESSOR_BATCH_SIZE=sent // 3)
        # each worker writes out what it counted within FLUSH_EVERY
        wait_for(lambda: value(samples(requests.get(api.url + "/metrics").text),
                               "analytics_request_duration_seconds_count", endpoint="/event") == sent + 1,
                 10, "the workers' counts did not all reach /metrics")
        for _ in range(6):      # whichever worker answers, it answers for all
            metrics = samples(requests.get(api.url + "/metrics").text)
            assert value(metrics, "analytics_events_accepted_total", endpoint="/event") == sent
            assert value(metrics, "analytics_requests_rejected_total", endpoint="/event",
                         reason="invalid") == 1
            assert value(metrics, "analytics_request_duration_seconds_count", endpoint="/event") == sent + 1
            assert value(metrics, "analytics_queue_size") == 0
            assert value(metrics, "analytics_processor_batch_size_count") == 3
            assert value(metrics, "analytics_processor_batch_size_sum") == sent
    finally:
        api.stop()


def test_api_workers_live_through_a_full_disk_and_count_its_503s_once_there_is_room(small_disk):
    """prometheus-client makes its files of values sparse: the first store into a page of one
    on a full disk was a SIGBUS that killed the worker half a second after its first request,
    and then each worker gunicorn started in its place."""
    api = Api(small_disk.path, workers=2)
    try:
        workers = wait_for(lambda: len(api.worker_pids()) == 2 and set(api.worker_pids()), 10,
                           "gunicorn did not start its two workers")
        small_disk.fill()
        refused = 0
        until = time.monotonic() + 4 * FLUSH_EVERY      # long enough for every worker to write out
        while time.monotonic() < until:
            response = requests.post(api.url + "/event", json=EVENT, timeout=10)
            if response.status_code == 200:     # it fitted in a block the queue file already had
                continue
            assert (response.status_code, response.json()) == (
                503, {"error": "Queue unavailable, event not stored; retry later"})
            refused += 1
        assert refused > 0
        assert set(api.worker_pids()) == workers, log_tail(small_disk.path, "gunicorn")
        assert requests.get(api.url + "/metrics", timeout=10).status_code == 200
        small_disk.free()
        assert requests.post(api.url + "/event", json=EVENT, timeout=10).status_code == 200
        wait_for(lambda: value(samples(requests.get(api.url + "/metrics", timeout=10).text),
                               "analytics_requests_rejected_total", endpoint="/event",
                               reason="unavailable") == refused,
                 10, "the 503s answered while the disk was full were not counted")
    finally:
        api.stop()


def test_a_processor_started_on_a_full_disk_waits_for_room_and_then_stores_every_event(
        small_disk, children):
    queue = FileQueue(str(small_disk.path / "event_queue.jsonl"))
    queue.append([encode_event(validate_event(dict(EVENT, user_id=f"u{i}"))) for i in range(10)])
    small_disk.fill()
    processor = start_processor(small_disk.path)
    children.append(processor)
    wait_for(lambda: "cannot start yet" in log_tail(small_disk.path, "processor") or processor.poll(),
             20, "the processor neither waited nor stopped")
    assert processor.poll() is None, f"exit {processor.poll()}: " + log_tail(small_disk.path, "processor")
    small_disk.free()
    wait_for(lambda: stored_count(small_disk.path) == 10, 30, "the events were not stored")
    from prometheus_client import generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
    directory = small_disk.path / "metrics" / PROCESSOR
    wait_for(lambda: value(samples(generate_latest(MultiProcessCollector(None, str(directory))).decode()),
                           "analytics_processor_batch_size_sum") == 10,
             10, "the batch was not in the processor's metrics")      # written just after the commit


def test_batch_metrics_that_cannot_be_written_are_skipped_and_said_so(tmp_path):
    child = run_on_a_full_disk(tmp_path, """
        import logging, os
        logging.basicConfig(format="%(message)s")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = full
        from metrics import ProcessorMetrics
        fill_the_disk()
        ProcessorMetrics().batch_stored(10, 0.5, 0)
        print("alive")
    """)
    assert (child.returncode, child.stdout) == (0, "alive\n"), child.stderr
    assert "batch metrics not written: " in child.stderr
    assert "No space left on device" in child.stderr
