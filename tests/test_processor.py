"""The processor, driven one step at a time."""
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest

from config import load_config
from events import encode_event, validate_event
from processes import (REPO, duplicated_user_ids, environment, exit_code, hold_write_lock, log_tail,
                       queue_counters, start_processor, stored_count, wait_for)
from processor import Processor
from shared_queue import open_queue, parse_checkpoint
from store import MIGRATIONS, WAL_SIZE_LIMIT, open_store
from test_queue import in_a_child_that_may_not_write_past


def event(i, site="s"):
    return encode_event(validate_event({"site_id": site, "event_type": "page_view",
                                        "path": f"/p{i % 3}", "user_id": f"u{i}"}))


@pytest.fixture
def queue(config):
    return open_queue(config)


@pytest.fixture
def processor(config, queue):
    processor = Processor(queue, open_store(config), config.with_overrides(processor_batch_size=4))
    processor.start()
    yield processor
    processor.close()


def stored_user_ids(config):
    connection = sqlite3.connect(config.database_path)
    return [row[0] for row in connection.execute("SELECT user_id FROM events ORDER BY id")]


def test_each_step_stores_one_batch_with_its_checkpoint(config, queue, processor):
    queue.append([event(i) for i in range(10)])
    assert processor.step() == 4
    assert stored_user_ids(config) == ["u0", "u1", "u2", "u3"]
    assert parse_checkpoint(processor.store.checkpoint("event_queue.jsonl"))[2] == 4
    assert processor.step() == 4
    assert processor.step() == 2
    assert processor.step() == 0
    assert queue.size() == 0


def test_restart_resumes_after_the_last_committed_batch(config, queue, processor):
    queue.append([event(i) for i in range(10)])
    processor.step()
    processor.close()
    restarted = Processor(open_queue(config), open_store(config), config)
    restarted.start()
    restarted.run(once=True)
    assert stored_user_ids(config) == [f"u{i}" for i in range(10)]


def test_a_batch_whose_commit_failed_is_read_again_not_skipped(config, queue, processor):
    queue.append([event(i) for i in range(6)])
    original_write = processor.store.write

    def failing_write(rows, name, checkpoint):
        raise sqlite3.OperationalError("disk I/O error")
    processor.store.write = failing_write
    with pytest.raises(sqlite3.OperationalError):
        processor.step()
    processor.store.write = original_write
    processor.run(once=True)
    assert stored_user_ids(config) == [f"u{i}" for i in range(6)]


def test_invalid_lines_go_to_the_dead_letter_file_and_processing_goes_on(config, queue, processor):
    queue.append([event(1), b"not json\n", b'{"site_id": 5}\n', b"[1]\n",
                  b'{"site_id":"s","event_type":"v","path":null,"user_id":null,"timestamp":"x"}\n',
                  event(2)])
    processor.run(once=True)
    assert stored_user_ids(config) == ["u1", "u2"]
    with open(config.dead_letter_path, "rb") as file:
        letters = [orjson.loads(line) for line in file]
    assert [letter["line"] for letter in letters] == [
        "not json", '{"site_id": 5}', "[1]",
        '{"site_id":"s","event_type":"v","path":null,"user_id":null,"timestamp":"x"}']
    assert all(letter["reason"] for letter in letters)
    assert processor.dead == 4


def test_a_batch_of_many_dead_letters_logs_the_first_few_and_one_line_that_counts_the_rest(
        config, queue, caplog):
    counted = []
    processor = Processor(queue, open_store(config), config.with_overrides(processor_batch_size=10_000),
                          on_batch=lambda lines, seconds, dead_letters: counted.append(dead_letters))
    processor.start()
    queue.append([b"not json %d\n" % i for i in range(1000)])
    try:
        processor.run(once=True)
    finally:
        processor.close()
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert [warning.split(" line=")[1] for warning in warnings[:-1]] == [
        f"'not json {i}'" for i in range(len(warnings) - 1)]
    assert 1 <= len(warnings) - 1 <= 10
    assert warnings[-1] == (f"dead letters not logged here count={1000 - (len(warnings) - 1)} "
                            f"file={config.dead_letter_path}")
    with open(config.dead_letter_path, "rb") as file:
        assert [orjson.loads(line)["line"] for line in file] == [f"not json {i}" for i in range(1000)]
    assert processor.dead == 1000 and counted == [1000]


def test_a_database_another_program_keeps_writing_is_an_outage_to_wait_out(config, queue, processor):
    from store import StoreUnavailable
    queue.append([event(1)])
    holder = hold_write_lock(config.database_path)
    try:
        with pytest.raises(StoreUnavailable) as outage:
            processor.step()                    # after the store's busy timeout
    finally:
        holder.rollback()
    assert "database is locked (another program is writing it" in str(outage.value)
    processor.run(once=True)
    assert stored_user_ids(config) == ["u1"]


def test_a_batch_retried_after_an_outage_writes_its_dead_letters_once(config, queue, processor):
    from store import StoreUnavailable
    queue.append([event(1), b"not json\n", event(2)])
    holder = hold_write_lock(config.database_path)
    try:
        with pytest.raises(StoreUnavailable):
            processor.step()
    finally:
        holder.rollback()
    processor.run(once=True)
    with open(config.dead_letter_path, "rb") as file:
        assert [orjson.loads(line)["line"] for line in file] == ["not json"]
    assert processor.dead == 1
    assert stored_user_ids(config) == ["u1", "u2"]


def test_dead_letters_cut_short_by_a_full_disk_are_cut_off_and_written_whole_by_the_retry(
        config, queue, processor):
    bad = [b'{"site_id": "%d", "padding": "%s"}' % (i, b"x" * 3000) for i in range(2)]
    queue.append([event(1), bad[0] + b"\n", bad[1] + b"\n", event(2)])

    def step():
        try:
            processor.step()
        except OSError as error:
            return error.strerror
    room_for_one_and_a_half_letters = 4800

    assert in_a_child_that_may_not_write_past(room_for_one_and_a_half_letters, step) == "File too large"
    processor.run(once=True)            # the retry, once there is room

    with open(config.dead_letter_path, "rb") as file:
        assert [orjson.loads(letter)["line"].encode() for letter in file] == bad
    assert stored_user_ids(config) == ["u1", "u2"]


def test_a_batch_of_only_bad_lines_still_moves_the_checkpoint(config, queue, processor):
    queue.append([b"garbage\n"] * 5)
    assert [processor.step(), processor.step(), processor.step()] == [4, 1, 0]
    assert queue.size() == 0
    assert parse_checkpoint(processor.store.checkpoint("event_queue.jsonl"))[2] == 5


def test_migrations_create_the_original_events_table(config, processor):
    connection = sqlite3.connect(config.database_path)
    columns = [row[1] for row in connection.execute("PRAGMA table_info(events)")]
    assert columns[:6] == ["id", "site_id", "event_type", "path", "user_id", "timestamp"]
    assert connection.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("fsync,synchronous", [("always", 2), ("batch", 1), ("never", 1)])
def test_the_processor_commits_with_synchronous_full_only_with_fsync_always(config, fsync, synchronous):
    """A power cut loses nothing committed only with FULL (README, FSYNC); NORMAL is 1."""
    store = open_store(config.with_overrides(fsync=fsync))
    assert store.connection.execute("PRAGMA synchronous").fetchone()[0] == synchronous
    store.close()


def test_the_write_ahead_log_shrinks_back_after_another_programs_large_transaction(config, queue, processor):
    """rebuild-rollups writes the whole rollups in one transaction (and a backup holds checkpoints
    back while the processor writes): SQLite reuses analytics.db-wal from its start once that is
    checkpointed, but keeps the file as large as it grew, for as long as any program has it open."""
    command = open_store(config)
    with command.atomic() as connection:
        connection.execute("CREATE TABLE scratch (data BLOB)")
        connection.executemany("INSERT INTO scratch VALUES (zeroblob(?))", [(1 << 20,)] * 80)
    command.close()
    wal = Path(config.database_path + "-wal")
    assert wal.stat().st_size > 80 << 20
    queue.append([event(1)])
    processor.step()
    assert wal.stat().st_size <= WAL_SIZE_LIMIT


def test_migrating_twice_changes_nothing(config):
    store = open_store(config)
    assert store.migrate() == store.migrate() == len(MIGRATIONS)


def test_processor_logs_to_its_log_file(config, queue, drain):
    import logging
    from processor import setup_logging
    setup_logging(config)
    try:
        queue.append([event(1)])
        drain()
    finally:
        for handler in logging.getLogger().handlers:
            handler.close()
        logging.getLogger().handlers.clear()
    with open(config.processor_log_path) as log_file:
        text = log_file.read()
    assert "processor started" in text and "processor stopped stored=1" in text


def test_an_event_delivered_twice_is_stored_and_counted_once(config, queue, processor):
    line = event(1)
    queue.append([line, event(2), line])
    processor.run(once=True)
    assert stored_user_ids(config) == ["u1", "u2"]
    store = open_store(config)
    from reports import Period
    stats = store.reports(store.connection).stats("s", Period())
    assert (stats["total_views"], stats["unique_users"]) == (2, 2)


def back_up(config, destination):
    source, copy = sqlite3.connect(config.database_path), sqlite3.connect(destination)
    source.backup(copy)
    source.close()
    copy.close()


def restore(config, backup):
    for suffix in ("-wal", "-shm"):
        Path(config.database_path + suffix).unlink(missing_ok=True)
    Path(backup).replace(config.database_path)


def queued_user_ids(config):
    """The user ids of every line the queue files still hold."""
    name = Path(config.queue_path).name
    return {orjson.loads(line)["user_id"] for path in Path(config.data_dir).glob(name + "*")
            if path.name == name or path.suffix[1:].isdigit()
            for line in path.read_bytes().splitlines()}


@pytest.mark.parametrize("segment_bytes", [1 << 20, 2500], ids=["segment kept", "segment reclaimed"])
def test_a_restored_backup_gets_what_the_queue_still_holds_once(config, drain, tmp_path, segment_bytes):
    settings = dict(segment_bytes=segment_bytes, processor_batch_size=3)
    config = config.with_overrides(**settings)
    queue = open_queue(config)
    queue.append([event(i) for i in range(10)])
    drain(**settings).close()
    back_up(config, tmp_path / "backup.db")     # its position: in the middle of the first segment
    queue.append([event(i) for i in range(10, 20)])
    drain(**settings).close()
    queue.append([event(i) for i in range(20, 25)])
    expected = {f"u{i}" for i in range(10)} | queued_user_ids(config)
    restore(config, tmp_path / "backup.db")
    drain(**settings).close()
    if segment_bytes > 2500:    # the backup's position is still in the queue: nothing is missing
        assert expected == {f"u{i}" for i in range(25)}
    else:                       # what was read after the backup went with its segment
        assert {f"u{i}" for i in range(20, 25)} <= expected < {f"u{i}" for i in range(25)}
    assert sorted(stored_user_ids(config)) == sorted(expected)      # each once
    store = open_store(config)
    from reports import Period
    assert store.reports(store.connection).stats("s", Period())["unique_users"] == len(expected)


def test_the_api_reads_a_backup_copied_over_the_database(config, drain, tmp_path):
    """README's restore with cp, which keeps the database's inode: the API must not read the old log."""
    from ingestion_api import create_app
    client = create_app(config).test_client()
    queue = open_queue(config)
    queue.append([event(i) for i in range(3)])
    drain().close()
    back_up(config, tmp_path / "backup.db")
    queue.append([event(i) for i in range(3, 6)])
    drain().close()
    assert client.get("/stats?site_id=s").get_json()["unique_users"] == 6     # its reader is open
    for suffix in ("-wal", "-shm"):
        Path(config.database_path + suffix).unlink()
    shutil.copyfile(tmp_path / "backup.db", config.database_path)
    queue.append([event(i) for i in range(6, 8)])
    drain().close()                 # the queue still holds 3..5 and now 6..7
    assert client.get("/stats?site_id=s").get_json()["unique_users"] == 8


def test_a_sqlite_database_that_cannot_be_opened_stops_the_processor_at_start(data_dir, children):
    processor = start_processor(data_dir, DATABASE_URL="/nonexistent/dir/a.db")
    children.append(processor)
    assert exit_code(processor, timeout=30) == 2
    log = log_tail(data_dir, "processor")
    assert "ERROR processor" in log
    assert "cannot start: SQLite /nonexistent/dir/a.db: unable to open database file" in log


def test_an_outage_is_logged_in_one_line_per_retry_and_the_batch_stored_after(config, queue, caplog):
    from store import StoreUnavailable
    queue.append([event(i) for i in range(3)])
    processor = Processor(queue, open_store(config), config)
    processor.start()
    real_write, failures = processor.store.write, []

    def write_after_an_outage(*args):
        if len(failures) < 2:
            failures.append(1)
            raise StoreUnavailable("PostgreSQL: server closed the connection\nunexpectedly")
        return real_write(*args)
    processor.store.write = write_after_an_outage
    processor.run(once=True)
    retries = [record for record in caplog.records if record.getMessage().startswith("batch failed")]
    assert [record.getMessage() for record in retries] == [
        "batch failed; retrying in 0.1s: PostgreSQL: server closed the connection unexpectedly",
        "batch failed; retrying in 0.2s: PostgreSQL: server closed the connection unexpectedly"]
    assert all(record.exc_info is None for record in retries)
    assert stored_user_ids(config) == ["u0", "u1", "u2"]


def test_a_database_whose_disk_fills_up_is_an_outage_logged_in_one_line_and_every_event_is_stored_once_after(
        small_disk, children):
    processor = start_processor(small_disk.path)
    children.append(processor)
    wait_for(lambda: "processor started" in log_tail(small_disk.path, "processor"), 30,
             "the processor did not start")
    processor.send_signal(signal.SIGSTOP)       # the events come, and the disk fills up, at once
    queue = open_queue(load_config(environ={}, data_dir=str(small_disk.path)))
    queue.append([event(i) for i in range(5000)])
    small_disk.fill()
    processor.send_signal(signal.SIGCONT)
    wait_for(lambda: "database or disk is full" in log_tail(small_disk.path, "processor"), 30,
             "the processor did not fail its batch")
    small_disk.free()
    wait_for(lambda: stored_count(small_disk.path) == 5000, 30, "the events were not stored")
    assert duplicated_user_ids(small_disk.path) == []
    assert queue_counters(small_disk.path) == (5000, 5000)
    log = log_tail(small_disk.path, "processor", size=100_000)
    assert "Traceback" not in log
    assert re.search(r"WARNING processor .* batch failed; retrying in [0-9.]+s: SQLite \S+analytics.db: "
                     r"database or disk is full\n", log)


class IdleThenBusy(threading.Event):
    """The stop flag of a processor whose clock is now[0]: each wait for the queue passes its time at
    once; after a minute of them the events come, and once they are stored the processor stops."""

    def __init__(self, now, processor, events):
        super().__init__()
        self.now, self.processor, self.events = now, processor, events

    def wait(self, timeout=None):
        self.now[0] += timeout
        if self.processor.stored == len(self.events):
            self.set()
        elif self.now[0] >= 60 and self.processor.queue.size() == 0 and self.processor.stored == 0:
            self.processor.queue.append(self.events)
        return self.is_set()


def test_the_progress_rate_after_an_idle_spell_counts_only_the_time_spent_working(
        config, queue, caplog, monkeypatch):
    import processor as processor_module
    now = [0.0]
    monkeypatch.setattr(processor_module, "time", SimpleNamespace(monotonic=lambda: now[0]))  # its clock
    caplog.set_level("INFO", logger="processor")

    def takes_a_second(lines, seconds, dead_letters):       # 100 events a second of work
        now[0] += 1.0
    processor = Processor(queue, open_store(config), config.with_overrides(processor_batch_size=100),
                          on_batch=takes_a_second)
    processor.stopping = IdleThenBusy(now, processor, [event(i) for i in range(1000)])
    processor.start()
    processor.run()
    assert processor.stored == 1000
    reported = [int(re.search(r"rate=(\d+)/s", record.getMessage())[1])
                for record in caplog.records if record.getMessage().startswith("progress ")]
    # a line every 5 s of work; the first may also count the last poll (50 ms) that found nothing
    assert len(reported) == 2 and all(99 <= rate <= 100 for rate in reported), reported


class WaitsAtOnce(threading.Event):
    """A stop flag whose waits return at once: the retries' waits are read from the log instead."""

    def wait(self, timeout=None):
        return self.is_set()


def test_retries_wait_twice_as_long_each_time_up_to_30s_and_start_over_once_a_batch_is_stored(
        config, queue, caplog):
    from store import StoreUnavailable
    queue.append([event(i) for i in range(2)])
    processor = Processor(queue, open_store(config), config.with_overrides(processor_batch_size=1))
    processor.start()
    processor.stopping = WaitsAtOnce()
    real_write, fails = processor.store.write, [True] * 10 + [False, True, False]

    def write_through_two_outages(*args):
        if fails.pop(0):
            raise StoreUnavailable("PostgreSQL: connection refused")
        return real_write(*args)
    processor.store.write = write_through_two_outages
    processor.run(once=True)
    waits = [float(re.match(r"batch failed; retrying in ([\d.]+)s", record.getMessage())[1])
             for record in caplog.records if record.getMessage().startswith("batch failed")]
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 0.1]
    assert stored_user_ids(config) == ["u0", "u1"]


# A processor whose log line is being written (to a real BufferedWriter, as stderr is) when
# SIGTERM comes: the raw write below is where the kernel would be when the signal lands.
STOPPED_WHILE_LOGGING = """
import io, json, logging, os, signal, sys, threading, types
from processor import install_signal_handlers, log

class SignalledMidWrite(io.RawIOBase):
    written, signalled = bytearray(), False
    def writable(self):
        return True
    def write(self, data):
        if not SignalledMidWrite.signalled:
            SignalledMidWrite.signalled = True
            os.kill(os.getpid(), signal.SIGTERM)
        SignalledMidWrite.written += data
        return len(data)

stream = io.TextIOWrapper(io.BufferedWriter(SignalledMidWrite()), line_buffering=True)
sys.stderr = stream                 # where the processor's console lines go
logging.basicConfig(stream=stream, level=logging.INFO, format="%(message)s")
processor = types.SimpleNamespace(stopping=threading.Event())
install_signal_handlers(processor)
log.info("batch stored rows=500")
stopping = processor.stopping.wait(10)
print(json.dumps({"stopping": stopping, "log": SignalledMidWrite.written.decode()}), file=sys.__stdout__)
"""


def test_a_sigterm_that_comes_while_a_line_is_logged_still_stops_the_processor_and_spoils_no_line(tmp_path):
    result = subprocess.run([sys.executable, "-c", STOPPED_WHILE_LOGGING], cwd=REPO, env=environment(tmp_path),
                            capture_output=True, text=True, timeout=60)
    outcome = orjson.loads(result.stdout)
    assert outcome["stopping"], outcome["log"]
    assert outcome["log"].splitlines() == ["batch stored rows=500", "SIGTERM: finishing the current batch, then stopping"]
