"""The whole system with real processes: gunicorn workers, the processor, signals and kill -9.

Every check counts events by a unique user_id, read straight from analytics.db:
an event acknowledged with a 200 must be stored exactly once, whatever was killed.
"""
import collections
import contextlib
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import orjson
import psutil
import pytest
import requests

from config import load_config
from events import encode_event, validate_event
from processes import (
    REPO, Api, Load, committed_checkpoint, duplicated_user_ids, environment, exit_code, free_port,
    hold_write_lock, is_healthy, log_tail, queue_counters, queue_files, run_processor_once, session,
    start_processor, stop, stored_count, stored_user_ids, wait_for)
from shared_queue import open_queue, parse_checkpoint

SEGMENT_BYTES = 20_000


def assert_exactly_once(data_dir, acknowledged, failed=frozenset()):
    """Every acknowledged id stored once; nothing stored that was never sent."""
    assert duplicated_user_ids(data_dir) == [], "events stored more than once"
    stored = stored_user_ids(data_dir)
    lost = acknowledged - stored
    assert not lost, f"{len(lost)} acknowledged events lost, e.g. {sorted(lost)[:5]}"
    unknown = stored - acknowledged - failed
    assert not unknown, f"{len(unknown)} stored events were never sent, e.g. {sorted(unknown)[:5]}"
    return stored


def sealed_segments(data_dir):
    return [name.rsplit(".", 1)[1] for name in queue_files(data_dir) if name != "event_queue.jsonl"]


def fill_queue(data_dir, site_id, count, chunk=1000):
    """Append count valid events straight to the queue, as the API would; returns their ids."""
    queue = open_queue(load_config(environ={}, data_dir=str(data_dir)))
    ids = []
    for start in range(0, count, chunk):
        batch = [f"{site_id}-{n}" for n in range(start, min(start + chunk, count))]
        queue.append([encode_event(validate_event(
            {"site_id": site_id, "event_type": "page_view", "path": "/", "user_id": user_id}))
            for user_id in batch])
        ids.extend(batch)
    queue.close()
    return set(ids)


def test_eight_workers_and_sixteen_clients_store_exactly_the_acknowledged_events(
        data_dir, children):
    api = Api(data_dir, workers=8)
    children.append(api)
    processor = start_processor(data_dir)
    children.append(processor)

    load = Load(api.url, "concurrency", threads=16, max_events=1500, max_seconds=90)
    acknowledged, failed = load.finish(timeout=120)
    assert not failed, f"{len(failed)} events were refused under plain load"
    assert len(acknowledged) == 16 * 1500

    wait_for(lambda: stored_count(data_dir) >= len(acknowledged), 60,
             f"processor did not store {len(acknowledged)} events")
    wait_for(lambda: api.health()["queue_size"] == 0, 10, "queue_size did not drop to 0")

    assert stop(processor, signal.SIGTERM) == 0
    run_processor_once(data_dir)      # anything left over would show up as extra rows

    assert stored_count(data_dir) == len(acknowledged)
    assert_exactly_once(data_dir, acknowledged)
    assert api.stats("concurrency")["total_views"] == len(acknowledged)
    dead_letters = data_dir / "dead_letter.jsonl"
    assert not dead_letters.exists(), \
        "a queued line was torn or interleaved:\n" + dead_letters.read_text()[:2000]
    for name in queue_files(data_dir):
        for line in (data_dir / name).read_bytes().splitlines():
            assert isinstance(orjson.loads(line), dict)


def test_health_queue_size_counts_exactly_the_events_not_yet_stored(data_dir, children):
    api = Api(data_dir, workers=4)
    children.append(api)
    # one event per batch: the counters are updated as often as possible while workers append
    processor = start_processor(data_dir, PROCESSOR_BATCH_SIZE=1)
    children.append(processor)
    load = Load(api.url, "backlog", threads=8, max_events=1000, max_seconds=60, max_batch=3)
    undercounts, checks = [], 0
    for checks in range(2000):
        if not load.running():
            break
        acknowledged_before = load.acked_so_far
        queue_size = api.health()["queue_size"]
        stored_after = stored_count(data_dir)
        # every event acknowledged before the request and not stored after it was in the queue
        if queue_size < acknowledged_before - stored_after:
            undercounts.append((queue_size, acknowledged_before - stored_after))
    acknowledged, failed = load.finish()
    assert not failed
    assert checks >= 10, f"/health was checked {checks} times while the load ran: too few to tell"
    wait_for(lambda: stored_count(data_dir) == len(acknowledged), 60, "processor fell behind")
    assert api.health()["queue_size"] == 0
    appended, consumed = queue_counters(data_dir)
    assert (appended, consumed) == (len(acknowledged), len(acknowledged)), (
        f"queue counters appended={appended} consumed={consumed} after {len(acknowledged)} "
        f"events were acknowledged and stored: updates to the appended count were lost")
    assert not undercounts, (
        f"/health reported fewer queued events than were acknowledged and not stored "
        f"{len(undercounts)} times, e.g. (reported, at least) {undercounts[:5]}")


def test_processor_killed_30_times_under_load_stores_every_event_exactly_once(data_dir, children):
    api = Api(data_dir, workers=4, QUEUE_SEGMENT_BYTES=SEGMENT_BYTES)
    children.append(api)
    load = Load(api.url, "crash", threads=4, max_events=50_000, max_seconds=90, max_batch=20)
    rng = random.Random(7)
    batch_sizes = [1, 7, 50, 3, 1000, 10_000]
    segments_seen, previous_segment = set(), None
    try:
        for kill in range(30):
            before = stored_count(data_dir)
            processor = start_processor(data_dir, QUEUE_SEGMENT_BYTES=SEGMENT_BYTES,
                                        PROCESSOR_BATCH_SIZE=batch_sizes[kill % len(batch_sizes)])
            children.append(processor)
            started = kill % 5 != 4     # otherwise kill it somewhere in its start-up
            if started:     # a hundred events at least, so that checkpoints cross segments
                wait_for(lambda: stored_count(data_dir) >= before + 100 or processor.poll() is not None,
                         60, f"processor made no progress (kill {kill})")
            time.sleep(rng.uniform(0, 0.02))    # a random instant, not a wait for work
            assert processor.poll() is None, \
                f"processor exited with {processor.returncode}:\n{log_tail(data_dir, 'processor')}"
            processor.kill()
            processor.wait(10)
            segment = parse_checkpoint(committed_checkpoint(data_dir))[0]
            segments_seen.add(segment)
            if started and previous_segment is not None:
                # a processor that got going has removed what was consumed before it started
                stale = [name for name in sealed_segments(data_dir) if int(name) < previous_segment]
                assert not stale, f"consumed segments {stale} were not deleted (kill {kill})"
            previous_segment = segment
        assert load.running(), "the load ended before the last kill"
    finally:
        acknowledged, failed = load.stop()

    run_processor_once(data_dir, QUEUE_SEGMENT_BYTES=SEGMENT_BYTES, PROCESSOR_BATCH_SIZE=200)
    assert not failed, f"{len(failed)} events were refused while only the processor was killed"
    assert len(acknowledged) > 5000, "too little load to mean anything"
    assert_exactly_once(data_dir, acknowledged)
    assert stored_count(data_dir) == len(acknowledged)
    assert not (data_dir / "dead_letter.jsonl").exists()

    assert len(segments_seen) > 3, f"segments did not rotate during the crashes: {segments_seen}"
    last_segment = parse_checkpoint(committed_checkpoint(data_dir))[0]
    assert all(int(name) >= last_segment for name in sealed_segments(data_dir)), \
        f"consumed segments left after a full drain: {queue_files(data_dir)}"
    assert len(sealed_segments(data_dir)) <= 1, f"old segments kept: {queue_files(data_dir)}"


def test_api_workers_killed_under_load_lose_no_acknowledged_event(data_dir, children):
    api = Api(data_dir, workers=4)
    children.append(api)
    processor = start_processor(data_dir)
    children.append(processor)
    load = Load(api.url, "workerkill", threads=8, max_events=20_000, max_seconds=60, max_batch=5)
    rng = random.Random(3)
    try:
        for kill in range(10):
            progress = load.acked_so_far
            wait_for(lambda: load.acked_so_far > progress + 100 or not load.running(), 30,
                     f"no events acknowledged after kill {kill}")
            victims = api.worker_pids()
            assert victims, "gunicorn has no workers"
            victim = rng.choice(victims)
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: victim not in api.worker_pids()
                     and len(api.worker_pids()) == 4, 30, "gunicorn did not replace the worker")
        assert load.running(), "the load ended before the last kill"
    finally:
        acknowledged, failed = load.stop()

    assert stop(processor, signal.SIGTERM) == 0
    run_processor_once(data_dir)
    assert len(acknowledged) > 1000, "too little load to mean anything"
    assert_exactly_once(data_dir, acknowledged, failed)


def post_batches(url, count, size, answered):
    """POST /events count batches of size events, each user_id naming its batch ("b7-123");
    answered[batch] says whether it got a 200."""
    http = session()
    path = "/" + "p" * 2040         # ~2 MB a batch: a long write, which a kill stops partway
    try:
        for number in range(count):
            events = [{"site_id": "atomic", "event_type": "page_view", "path": path,
                       "user_id": f"b{number}-{i}"} for i in range(size)]
            try:
                ok = http.post(url + "/events", json=events, timeout=30).status_code == 200
            except (requests.RequestException, OSError):   # no answer: maybe stored or not
                ok = False
            answered[f"b{number}"] = ok
    finally:
        http.close()


def test_a_batch_whose_api_worker_is_killed_mid_write_is_stored_whole_or_not_at_all(data_dir, children):
    api = Api(data_dir, workers=2, MAX_BATCH_BODY_BYTES=4 * 1024 * 1024)
    children.append(api)
    size, answered = 1000, {}
    client = threading.Thread(target=post_batches, args=(api.url, 40, size, answered))
    client.start()
    queue = data_dir / "event_queue.jsonl"
    rng = random.Random(11)
    while client.is_alive():
        time.sleep(rng.uniform(0.05, 0.2))
        queued, workers = queue.stat().st_size, api.worker_pids()
        deadline = time.monotonic() + 1
        while queue.stat().st_size == queued and time.monotonic() < deadline:
            pass            # until a worker starts writing a batch
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    client.join()
    run_processor_once(data_dir)

    assert duplicated_user_ids(data_dir) == [], "events stored more than once"
    stored = collections.Counter(user_id.split("-")[0] for user_id in stored_user_ids(data_dir))
    torn = {batch: count for batch, count in stored.items() if count != size}
    assert not torn, f"batches stored in part (events stored of {size}): {torn}"
    lost = [batch for batch, ok in answered.items() if ok and stored[batch] != size]
    assert not lost, f"batches answered 200 and not stored: {lost}"
    assert not (data_dir / "dead_letter.jsonl").exists()
    cut = log_tail(data_dir, "gunicorn", size=10**7).count("a write whose writer died")
    assert cut > 0 and not all(answered.values()), \
        "no worker was killed mid-write: the test proved nothing"


# SIGHUP: the terminal the processor runs in was closed, or a kill -HUP meant as a reload; its
# exit status is still that of a hangup, so that Restart=on-failure starts it again.
@pytest.mark.parametrize("stop_signal, status", [(signal.SIGTERM, 0), (signal.SIGHUP, 129)],
                         ids=["SIGTERM", "SIGHUP"])
def test_sigterm_or_a_hangup_finishes_the_batch_and_commits(data_dir, children, stop_signal, status):
    queued = fill_queue(data_dir, "graceful", 100_000)
    processor = start_processor(data_dir, PROCESSOR_BATCH_SIZE=500)
    children.append(processor)
    wait_for(lambda: stored_count(data_dir) > 0, 30, "processor did not start storing")
    processor.send_signal(stop_signal)
    assert exit_code(processor, 30) == status

    stored = stored_count(data_dir)
    assert 0 < stored < len(queued), "the processor should have stopped inside the backlog"
    assert stored % 500 == 0, "the last batch was not finished"
    assert parse_checkpoint(committed_checkpoint(data_dir))[2] == stored, \
        "the committed checkpoint does not match the stored rows"
    assert f"{stop_signal.name}: finishing the current batch" in (data_dir / "processor.log").read_text()

    run_processor_once(data_dir)
    assert stored_count(data_dir) == len(queued)
    assert_exactly_once(data_dir, queued)


def test_a_second_signal_exits_at_once_with_a_nonzero_code(data_dir, children):
    queued = fill_queue(data_dir, "impatient", 100_000)
    processor = start_processor(data_dir)
    children.append(processor)
    wait_for(lambda: stored_count(data_dir) > 0, 30, "processor did not start storing")
    processor.send_signal(signal.SIGTERM)
    processor.send_signal(signal.SIGINT)
    code = exit_code(processor, 10)
    assert code != 0, "a second signal must not wait for a clean stop"
    assert "exiting now" in (data_dir / "processor.log").read_text()

    run_processor_once(data_dir)
    assert stored_count(data_dir) == len(queued)
    assert_exactly_once(data_dir, queued)


def test_a_second_processor_on_the_same_queue_exits_nonzero_and_says_why(data_dir, children):
    first = start_processor(data_dir)
    children.append(first)
    wait_for(lambda: (data_dir / "processor.log").exists()
             and "processor started" in (data_dir / "processor.log").read_text(),
             30, "first processor did not start")

    second = start_processor(data_dir, "--once", log_name="second")
    children.append(second)
    assert exit_code(second, 30) != 0
    assert "another processor is already consuming" in log_tail(data_dir, "second")
    assert "another processor is already consuming" in (data_dir / "processor.log").read_text()

    assert first.poll() is None, "the first processor must keep running"
    queued = fill_queue(data_dir, "second", 10)
    wait_for(lambda: stored_count(data_dir) == 10, 30, "the first processor stopped consuming")
    assert_exactly_once(data_dir, queued)


def test_once_drains_the_queue_exits_0_and_logs_to_processor_log(data_dir, children):
    api = Api(data_dir, workers=2)
    children.append(api)
    load = Load(api.url, "once", threads=2, max_events=100, max_seconds=30)
    acknowledged, failed = load.finish()
    assert not failed and len(acknowledged) == 200
    assert api.health()["queue_size"] == 200

    run_processor_once(data_dir)

    assert api.health()["queue_size"] == 0
    assert api.stats("once")["total_views"] == 200
    assert_exactly_once(data_dir, acknowledged)
    log = (data_dir / "processor.log").read_text()
    assert "processor started" in log
    assert "processor stopped stored=200" in log


@pytest.mark.parametrize("command", [["ingestion_api.py"], ["-m", "gunicorn", "ingestion_api:app"]],
                         ids=["python", "gunicorn"])
def test_an_api_that_cannot_open_its_database_says_so_in_one_line(tmp_path, command):
    database = tmp_path / "no such folder" / "analytics.db"
    result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True,
                            timeout=60, env=environment(tmp_path, PORT=free_port(), DATABASE_URL=database))
    assert result.returncode != 0
    assert f"cannot start: SQLite {database}: unable to open database file\n" in result.stderr
    assert "Traceback" not in result.stderr


def test_api_workers_started_while_another_program_writes_the_database_boot(data_dir, children):
    api = Api(data_dir, workers=2)
    children.append(api)
    holder = hold_write_lock(data_dir / "analytics.db")
    try:
        old_workers = set(api.worker_pids())
        os.kill(api.process.pid, signal.SIGHUP)     # new workers, as a reload or a crashed worker gets

        def new_workers_answer():
            assert api.process.poll() is None, "gunicorn stopped:\n" + log_tail(data_dir, "gunicorn")
            workers = set(api.worker_pids())
            return len(workers) == 2 and not workers & old_workers and is_healthy(api.url)
        wait_for(new_workers_answer, 30, "the reloaded workers answer")
        assert requests.post(api.url + "/event", json={"site_id": "s", "event_type": "page_view"},
                             timeout=10).status_code == 200
        assert api.process.poll() is None, "gunicorn stopped:\n" + log_tail(data_dir, "gunicorn")
    finally:
        holder.rollback()


def test_an_api_started_while_another_program_writes_a_current_database_boots_at_once(data_dir, children):
    from store import SQLiteStore
    store = SQLiteStore(str(data_dir / "analytics.db"))
    store.migrate()
    store.close()
    holder = hold_write_lock(data_dir / "analytics.db")
    try:
        children.append(Api(data_dir, workers=1))
        assert "cannot migrate the database yet" not in log_tail(data_dir, "gunicorn")
    finally:
        holder.rollback()


def at_schema_version(data_dir, version):
    from store import MIGRATIONS
    connection = sqlite3.connect(data_dir / "analytics.db")
    for migration in MIGRATIONS[:version]:
        connection.executescript(migration)
    connection.execute(f"PRAGMA user_version = {version}")
    connection.execute("PRAGMA journal_mode=WAL")
    connection.close()


def test_an_api_started_while_another_program_migrates_the_database_takes_events_at_once(
        data_dir, children):
    """Ingestion needs no database: an upgrade whose migration runs for minutes (the first from
    schema version 1 or 2 folds every stored event into the rollups) must not stop it."""
    from store import MIGRATIONS
    at_schema_version(data_dir, 1)          # events and no rollups yet
    holder = hold_write_lock(data_dir / "analytics.db")
    try:
        api = Api(data_dir, workers=1)
        children.append(api)
        event = {"site_id": "during", "event_type": "page_view", "path": "/"}
        assert requests.post(api.url + "/event", json=event, timeout=30).status_code == 200
        assert api.health() == {"status": "healthy", "service": "ingestion_api", "queue_size": 1}
        assert requests.get(api.url + "/stats?site_id=during", timeout=30).status_code == 503
    finally:
        holder.rollback()
    run_processor_once(data_dir)
    assert sqlite3.connect(data_dir / "analytics.db").execute(
        "PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert api.stats("during")["total_views"] == 1


@pytest.mark.parametrize("command", [["ingestion_api.py"], ["-m", "gunicorn", "ingestion_api:app"]],
                         ids=["python", "gunicorn"])
def test_ctrl_c_while_the_api_waits_for_the_database_stops_it_without_a_traceback(data_dir, command):
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/test"     # a server still starting
    err = data_dir.parent / "api.err"
    try:
        with open(err, "w") as stderr:
            api = subprocess.Popen([sys.executable, *command], cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=stderr, start_new_session=True,  # so that stop() ends its workers too
                                   env=environment(data_dir, PORT=free_port(), DATABASE_URL=unreachable))
        wait_for(lambda: "cannot migrate the database yet" in err.read_text(), 30, "the API waits")
        api.send_signal(signal.SIGINT)
        assert api.wait(timeout=30) == 130
    finally:
        stop(api)
    assert "Traceback" not in err.read_text()


@pytest.mark.parametrize("url,problem", [
    ("bogus://user:s3cret@x", "unknown storage scheme 'bogus'"),
    ("memcached://host:11211", "'pymemcache' prerequisite not available"),
    ("redis://host:port/0", "Port could not be cast to integer value as 'port'"),
    # a raw / ends the host early, and the client reads s3cr as the port
    ("redis://:s3cr/t@host:6379/0", "write @ / ? # % and spaces in its password percent-encoded (p/ss is p%2Fss)")])
@pytest.mark.parametrize("command", [["ingestion_api.py"], ["-m", "gunicorn", "ingestion_api:app"]],
                         ids=["python", "gunicorn"])
def test_a_rate_limit_storage_url_that_cannot_be_used_is_named_in_one_line(
        data_dir, command, url, problem):
    result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True,
                            timeout=60, env=environment(data_dir, PORT=free_port(),
                                                        RATE_LIMIT_STORAGE_URL=url))
    assert result.returncode != 0
    assert f"configuration error: RATE_LIMIT_STORAGE_URL cannot be used: {problem}. Unset it" \
        in result.stderr
    assert "Traceback" not in result.stderr and "s3cr" not in result.stderr


@pytest.mark.parametrize("workers", [{"WEB_CONCURRENCY": "0"}, {"GUNICORN_CMD_ARGS": "--workers 0"}],
                         ids=["WEB_CONCURRENCY", "GUNICORN_CMD_ARGS"])
def test_gunicorn_with_no_workers_stops_at_once_instead_of_listening_and_never_answering(
        data_dir, workers):
    result = subprocess.run([sys.executable, "-m", "gunicorn", "ingestion_api:app"], cwd=REPO,
                            capture_output=True, text=True, timeout=60,
                            env=environment(data_dir, PORT=free_port(), **workers))
    assert result.returncode != 0
    assert "configuration error: gunicorn needs at least 1 worker (WEB_CONCURRENCY or --workers), not 0" \
        in result.stderr
    assert "Listening at" not in result.stderr


def test_gunicorn_with_preload_stops_at_once_instead_of_serving_without_metrics_or_key_reloads(data_dir):
    result = subprocess.run([sys.executable, "-m", "gunicorn", "--preload", "ingestion_api:app"], cwd=REPO,
                            capture_output=True, text=True, timeout=60,
                            env=environment(data_dir, PORT=free_port()))
    assert result.returncode != 0
    assert "configuration error: gunicorn's --preload (preload_app) builds the app before" in result.stderr
    assert "Listening at" not in result.stderr and "Traceback" not in result.stderr


def test_the_keys_file_is_read_again_on_sighup_and_a_bad_edit_keeps_the_last_good_keys(data_dir, children):
    keys = data_dir.parent / "keys"
    keys.write_text("old-key\nnew-key\n")
    keys.chmod(0o600)
    api = Api(data_dir, workers=2, API_KEYS_FILE=str(keys))
    children.append(api)

    def report_with(key):
        return requests.get(api.url + "/stats", params={"site_id": "s"}, timeout=10,
                            headers={"Authorization": f"Bearer {key}"}).status_code

    def reload_workers():
        old_workers = set(api.worker_pids())
        os.kill(api.process.pid, signal.SIGHUP)

        def new_workers_answer():
            assert api.process.poll() is None, "gunicorn stopped:\n" + log_tail(data_dir, "gunicorn")
            workers = set(api.worker_pids())
            return len(workers) == 2 and not workers & old_workers and is_healthy(api.url)
        wait_for(new_workers_answer, 30, "the reloaded workers answer")

    keys.write_text("new-key\n")          # a key taken out is refused once the workers are new
    reload_workers()
    assert (report_with("old-key"), report_with("new-key")) == (401, 200)

    keys.write_text("")                   # a slip: ingestion goes on, and so do the keys read before
    reload_workers()
    refused = [line for line in log_tail(data_dir, "gunicorn").splitlines() if "holds no keys" in line]
    assert len(refused) == 1 and "API_KEYS_FILE" in refused[0], refused
    assert refused[0].endswith("README.md. The workers keep the settings read before."), refused[0]
    keys.unlink()
    killed = api.worker_pids()[0]
    os.kill(killed, signal.SIGKILL)       # its replacement boots all the same

    def both_workers_answered():
        assert api.process.poll() is None, "gunicorn stopped:\n" + log_tail(data_dir, "gunicorn")
        assert requests.post(api.url + "/event", json={"site_id": "s", "event_type": "page_view"},
                             timeout=10).status_code == 200
        assert (report_with("old-key"), report_with("new-key")) == (401, 200)
        workers = [psutil.Process(pid) for pid in api.worker_pids() if pid != killed]
        # a worker opens the queue when it first takes an event in
        return len(workers) == 2 and all(any(file.path.startswith(str(data_dir)) for file in worker.open_files())
                                         for worker in workers)
    wait_for(both_workers_answered, 30, "the new worker answers")
    assert api.process.poll() is None, "gunicorn stopped:\n" + log_tail(data_dir, "gunicorn")


def test_gunicorn_opens_no_control_socket_that_other_instances_would_share(data_dir, children):
    api = Api(data_dir, workers=1)
    children.append(api)
    sockets = [connection.laddr for connection in psutil.Process(api.process.pid).net_connections("unix")]
    assert not [path for path in sockets if path.endswith(".ctl")], sockets
    assert "Control socket" not in log_tail(data_dir, "gunicorn")


def test_make_run_runs_api_and_processor_together_and_ctrl_c_stops_both_cleanly(data_dir):
    # the README's first command (-o: the virtual environment the tests run in is taken as it is)
    port = free_port()
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"
    honcho = subprocess.Popen(["make", "-o", ".venv/installed", "run"], cwd=REPO,
                              env=environment(data_dir, PORT=port, PATH=path), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: is_healthy(url), 60, "the API did not start")
        sent = requests.post(url + "/event", json={"site_id": "procfile.example", "event_type": "page_view",
                                                   "path": "/"}, timeout=10)
        assert sent.status_code == 200
        wait_for(lambda: requests.get(url + "/stats", params={"site_id": "procfile.example"},
                                      timeout=10).json()["total_views"] == 1, 30, "the event was not stored")
        os.killpg(honcho.pid, signal.SIGINT)       # Ctrl-C in the terminal signals the whole group
        output = honcho.communicate(timeout=60)[0]
    finally:
        stop(honcho)
    assert "processor stopped stored=1" in output, output        # its batch finished, not killed
    assert "processor.1 stopped (rc=0)" in output and "api.1 stopped (rc=0)" in output, output
    # no "make: *** [run] Error 130": make itself ends as Ctrl-C'd programs do
    assert honcho.returncode in (0, -signal.SIGINT) and "Error" not in output, output


CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/156.0.0.0 Safari/537.36")


@pytest.mark.parametrize("path", ["/event", "/events", "/api/event"])
def test_a_chunked_body_gunicorn_cannot_parse_is_a_400_not_a_500(data_dir, children, path):
    api = Api(data_dir, workers=1)
    children.append(api)
    # a browser's User-Agent: /api/event drops a bot's event before reading it
    request = (f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nUser-Agent: {CHROME}\r\n"
               "Content-Type: text/plain\r\nConnection: close\r\n\r\n"
               'zz\r\n{"site_id":"s","event_type":"v"}\r\n0\r\n\r\n').encode()
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"Invalid request body" in answer


@pytest.mark.parametrize("request_head, status, error", [
    (b"GARBAGE\r\n\r\n", 400, "Invalid Request Line"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "Invalid HTTP Header: 'Bad Header'"),
    (b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", 400, "Invalid HTTP Version"),
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "Request Line is too large"),
    (b"GET /h\xe9 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "Invalid Request Line"),
], ids=["request line", "header", "version", "long line", "latin-1"])
def test_a_request_gunicorn_cannot_parse_is_answered_in_json_like_the_app(
        data_dir, children, request_head, status, error):
    api = Api(data_dir, workers=1)
    children.append(api)
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as connection:
        connection.sendall(request_head)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, body = answer.split(b"\r\n\r\n", 1)
    status_line, *headers = head.decode("latin-1").split("\r\n")
    assert status_line.startswith(f"HTTP/1.1 {status} "), head
    assert "Content-Type: application/json" in headers
    assert "X-Content-Type-Options: nosniff" in headers      # as every answer of the app
    assert f"Content-Length: {len(body)}" in headers
    assert orjson.loads(body)["error"].startswith(error)


@pytest.mark.parametrize("path, size", [("/event", 300_000), ("/events", 1024 * 1024 + 1)])
def test_a_body_over_the_limit_is_read_before_its_413_so_the_client_or_proxy_gets_the_answer(
        data_dir, children, path, size):
    # a proxy (nginx) that sends the body after the API has answered must not meet a closed
    # connection: it would answer its own 502 in place of the 413
    api = Api(data_dir, workers=1)
    children.append(api)
    body = b"[" + b" " * (size - 2) + b"]"
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as connection:
        connection.sendall(head + body[:65536])
        time.sleep(0.5)         # the API answers from the head; the rest of the body comes later,
        for start in range(65536, size, 16384):         # as a proxy sends it: piece by piece
            connection.sendall(body[start:start + 16384])
            time.sleep(0.01)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"Request body too large" in answer


def send_and_close(port, request):
    """Send request, close our sending side as a client that stops mid-upload does, read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        connection.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


NDJSON_LINES = b"".join(b'{"site_id":"cut","event_type":"page_view","path":"/%d"}\n' % n for n in range(5))
NDJSON_PART = NDJSON_LINES[:NDJSON_LINES.index(b"\n", 100) + 1]     # whole lines: valid NDJSON by itself


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_cut_off_before_its_end_is_a_400_and_nothing_of_it_is_queued(data_dir, children, framing):
    api = Api(data_dir, workers=1)
    children.append(api)
    if framing == "content-length":
        framing = f"Content-Length: {len(NDJSON_LINES)}\r\n\r\n".encode() + NDJSON_PART
    else:                           # the last chunk, of size 0, never comes
        framing = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(NDJSON_PART), NDJSON_PART)
    answer = send_and_close(api.port, b"POST /events HTTP/1.1\r\nHost: x\r\n"
                                      b"Content-Type: application/x-ndjson\r\n" + framing)
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400"), answer
    assert orjson.loads(body)["error"].startswith("Incomplete request body")
    assert api.health()["queue_size"] == 0


@pytest.fixture
def world_readable_umask():
    """The umask most systems give a service (022): files would be readable by every user."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_the_files_that_hold_events_or_salts_are_the_owners_alone_whatever_the_umask(
        data_dir, children, world_readable_umask):
    api = Api(data_dir, workers=2, QUEUE_SEGMENT_BYTES=SEGMENT_BYTES)
    children.append(api)
    http = session()
    browser = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0"}
    assert http.post(api.url + "/api/event", headers=browser,        # the day's visitor salt
                     json={"n": "pageview", "d": "private", "u": "http://private/"}).status_code == 202
    fill_queue(data_dir, "private", 300)
    open_queue(load_config(environ={}, data_dir=str(data_dir))).append([b'{"site_id": 1}\n'])
    processor = start_processor(data_dir, QUEUE_SEGMENT_BYTES=SEGMENT_BYTES)
    children.append(processor)
    wait_for(lambda: stored_count(data_dir) == 301, 60, "the processor to store every event")
    backup = subprocess.run([sys.executable, "processor.py", "backup", str(data_dir / "backups" / "a.db")],
                            cwd=REPO, env=environment(data_dir), capture_output=True, timeout=60)
    assert backup.returncode == 0, backup.stderr
    assert sealed_segments(data_dir)
    private = ["analytics.db", "analytics.db-wal", "analytics.db-shm", "dead_letter.jsonl",
               "backups/a.db", *queue_files(data_dir)]
    modes = {name: oct((data_dir / name).stat().st_mode & 0o777) for name in private}
    assert modes == {name: "0o600" for name in private}
