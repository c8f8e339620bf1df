"""The file queue: whole lines under concurrency, torn tails, rotation, one consumer, a full disk."""
import fcntl
import multiprocessing
import os
import errno
import resource
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from events import encode_event, validate_event
from ingestion_api import create_app
from processor import Processor
import shared_queue
from shared_queue import FileQueue, QueueBusy, QueueUnavailable, open_for_mapping, open_queue
from store import open_store

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def line(i):
    return b'{"n":%d,"pad":"%s"}\n' % (i, b"x" * (i % 50))


def write_lines(path, writer, count, per_append):
    queue = FileQueue(path)
    for start in range(0, count, per_append):
        queue.append([line(writer * 1_000_000 + i)
                      for i in range(start, min(start + per_append, count))])


def read_all(consumer, max_items=1000):
    lines = []
    while True:
        batch = consumer.read(max_items)
        if not batch.items:
            return lines
        lines.extend(batch.items)
        consumer.acknowledge(batch)


@pytest.fixture
def queue_path(tmp_path):
    return str(tmp_path / "event_queue.jsonl")


def test_concurrent_writer_processes_never_interleave_or_lose_lines(queue_path):
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=write_lines, args=(queue_path, w, 2000, 1 + w * 3))
               for w in range(6)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(60)
        assert process.exitcode == 0
    lines = read_all(FileQueue(queue_path).consumer())
    expected = {line(w * 1_000_000 + i)[:-1] for w in range(6) for i in range(2000)}
    assert len(lines) == len(expected) == 12_000
    assert set(lines) == expected


def test_threads_of_one_process_do_not_interleave(queue_path):
    import threading
    queue = FileQueue(queue_path)
    threads = [threading.Thread(target=lambda w=w: [queue.append([line(w * 1_000_000 + i)])
                                                    for i in range(1000)]) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(read_all(queue.consumer()))) == 8000


def test_torn_last_line_is_never_half_read(queue_path):
    queue = FileQueue(queue_path)
    queue.append([line(1)])
    with open(queue_path, "ab") as file:
        file.write(b'{"n":2,"pa')              # a writer died mid-line
    consumer = queue.consumer()
    assert consumer.read(10).items == [line(1)[:-1]]


def test_line_completed_later_is_read_whole(queue_path):
    queue = FileQueue(queue_path)
    with open(queue_path, "ab") as file:
        file.write(b'{"n":1,')
    consumer = queue.consumer()
    assert consumer.read(10).items == []
    with open(queue_path, "ab") as file:
        file.write(b'"pad":""}\n')
    assert consumer.read(10).items == [b'{"n":1,"pad":""}']


def test_next_append_after_a_torn_line_stays_whole(queue_path):
    queue = FileQueue(queue_path)
    with open(queue_path, "ab") as file:
        file.write(b'{"torn')
    queue.append([line(7)])
    assert queue.consumer().read(10).items == [b'{"torn', line(7)[:-1]]


def test_read_respects_max_items_and_resumes_from_checkpoint(queue_path):
    queue = FileQueue(queue_path)
    queue.append([line(i) for i in range(10)])
    consumer = queue.consumer()
    first = consumer.read(4)
    assert first.items == [line(i)[:-1] for i in range(4)]
    consumer.close()        # crashed before acknowledging: the store kept no checkpoint
    again = queue.consumer(None)
    assert again.read(4).items == first.items
    again.close()
    resumed = queue.consumer(first.checkpoint)
    assert resumed.read(100).items == [line(i)[:-1] for i in range(4, 10)]


def test_only_one_consumer_at_a_time(queue_path):
    queue = FileQueue(queue_path)
    first = queue.consumer()
    with pytest.raises(QueueBusy, match="another processor"):
        FileQueue(queue_path).consumer()
    first.close()
    FileQueue(queue_path).consumer().close()


def test_a_queue_file_that_cannot_be_opened_leaves_no_descriptor_open_at_each_try(queue_path):
    os.mkdir(queue_path)       # no file can be opened there, whoever runs the tests
    queue = FileQueue(queue_path)
    with pytest.raises(QueueUnavailable):
        queue.size()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):         # /health and /metrics ask on every call
        with pytest.raises(QueueUnavailable):
            queue.size()
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.fixture
def synced_inodes(monkeypatch):
    """The inode of every file fdatasync is called on, in order."""
    inodes, fdatasync = [], os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (inodes.append(os.fstat(fd).st_ino), fdatasync(fd)))
    return inodes


def eventually(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_with_fsync_batch_the_last_append_before_a_lull_is_synced_too(queue_path, synced_inodes):
    """FSYNC=batch: a power cut loses at most FSYNC_INTERVAL of acknowledged events, however
    long the API then waits for the next one."""
    queue = FileQueue(queue_path, fsync="batch", fsync_interval=0.05)
    queue.append([line(1)])         # synced at once: none was for an interval
    queue.append([line(2)])         # within the interval: left for later
    assert eventually(lambda: len(synced_inodes) == 2)


def test_with_fsync_batch_a_sealed_segment_is_synced_before_the_writer_moves_on(queue_path, synced_inodes):
    queue = FileQueue(queue_path, fsync="batch", fsync_interval=3600)
    queue.append([line(1)])
    queue.append([line(2)])
    sealed = os.stat(queue_path).st_ino
    os.rename(queue_path, queue_path + ".1")     # as the consumer seals a full segment
    queue.append([line(3)])
    assert synced_inodes.count(sealed) == 2


def test_size_counts_acknowledged_but_unconsumed_events(queue_path):
    queue = FileQueue(queue_path)
    queue.append([line(i) for i in range(5)])
    assert queue.size() == 5
    consumer = queue.consumer()
    consumer.acknowledge(consumer.read(3))
    assert queue.size() == 2


def test_size_counts_what_is_left_once_the_processor_restarts_from_its_checkpoint(queue_path):
    queue = FileQueue(queue_path)
    queue.append([line(i) for i in range(5)])
    stored = consumed_up_to(FileQueue(queue_path), 3)
    FileQueue(queue_path).consumer(stored)
    assert queue.size() == 2


def accepted_at(seconds):
    """A queued line whose id says it was accepted at seconds since 1970, as the API's ids do."""
    return b'{"id":"%014x%016x"}\n' % (int(seconds * 1_000_000), 0)


def test_the_oldest_age_is_that_of_the_first_event_not_yet_stored(queue_path):
    queue = FileQueue(queue_path)
    queue.append([accepted_at(time.time() - 3600), accepted_at(time.time())])
    consumer = queue.consumer()
    assert queue.oldest_age() >= 3600
    consumer.acknowledge(consumer.read(1))
    assert queue.oldest_age() < 1800


def test_size_is_recounted_when_the_state_file_is_lost(queue_path):
    FileQueue(queue_path).append([line(i) for i in range(5)])
    os.remove(queue_path + ".state")
    queue = FileQueue(queue_path)
    queue.consumer()
    assert queue.size() == 5


def killed_mid_write(queue_path, data):
    """What a writer killed before recording where its write ends leaves: data past that end."""
    with open(queue_path, "ab") as file:
        file.write(data)


def uncount(queue_path, lines):
    """Take lines off the appended counter, as a writer killed after recording where its write
    ends and before counting it leaves it."""
    with open(queue_path + ".state", "r+b") as state:
        appended = struct.unpack("<Q", state.read(8))[0]
        state.seek(0)
        state.write(struct.pack("<Q", appended - lines))


def forget_where_whole_writes_end(queue_path):
    """Zero the lock file's copy of where the last whole write ended, as in a queue of the
    previous version, which kept it in the state file only."""
    zero(queue_path + ".lock")


def test_size_is_exact_again_once_the_consumer_catches_up_after_a_writer_died_before_counting(
        queue_path):
    queue = FileQueue(queue_path)
    queue.append([line(i) for i in range(3)])
    consumer = queue.consumer()
    queue.append([line(3)])
    uncount(queue_path, 1)      # killed after recording where its write ends
    assert queue.size() == 3
    assert len(read_all(consumer)) == 4
    assert queue.size() == 0
    queue.append([line(i) for i in range(4, 9)])
    assert queue.size() == 5
    assert read_all(consumer) == [line(i)[:-1] for i in range(4, 9)]


def test_a_state_file_deleted_while_the_api_runs_is_followed_after_the_processor_restarts(
        queue_path):
    api = FileQueue(queue_path)
    api.append([line(i) for i in range(5)])
    stored = consumed_up_to(FileQueue(queue_path), 5)
    os.remove(queue_path + ".state")
    api.append([line(i) for i in range(5, 8)])
    restarted = FileQueue(queue_path).consumer(stored)
    assert len(read_all(restarted)) == 3
    assert api.size() == 0
    api.append([line(8)])
    assert api.size() == 1


def test_a_state_file_deleted_while_everything_runs_counts_exactly_again_once_read_up_to_date(
        queue_path):
    api = FileQueue(queue_path)
    api.append([line(i) for i in range(5)])
    processor = FileQueue(queue_path).consumer()
    read_all(processor)
    os.remove(queue_path + ".state")
    assert api.size() == 0              # /health, answered from a new state file
    api.append([line(i) for i in range(5, 8)])
    assert len(read_all(processor)) == 3
    assert api.size() == 0
    api.append([line(8)])
    assert api.size() == 1


def test_consumed_segments_are_reclaimed_while_writers_append(queue_path):
    queue = FileQueue(queue_path, segment_bytes=2000)
    consumer = queue.consumer()
    writer = FileQueue(queue_path, segment_bytes=2000)   # another process's view
    seen = []
    for round_number in range(50):
        writer.append([line(round_number * 100 + i) for i in range(20)])
        batch = consumer.read(15)
        seen.extend(batch.items)
        consumer.acknowledge(batch)
    seen.extend(read_all(consumer))
    assert seen == [line(r * 100 + i)[:-1] for r in range(50) for i in range(20)]
    directory = os.path.dirname(queue_path)
    queue_bytes = sum(os.path.getsize(os.path.join(directory, name))
                      for name in os.listdir(directory) if name.startswith("event_queue.jsonl"))
    assert queue_bytes < 3 * 2000 + 4096
    assert int(consumer.read(1).checkpoint.split(":")[0]) > 5    # it did rotate


def test_the_processor_holds_no_reclaimed_segment_open(queue_path):
    # a segment deleted while a descriptor is open keeps its disk space (up to
    # QUEUE_SEGMENT_BYTES) until that descriptor is closed
    processor = FileQueue(queue_path, segment_bytes=2000)
    consumer = processor.consumer()
    api = FileQueue(queue_path, segment_bytes=2000)
    for round_number in range(10):
        api.append([line(round_number * 100 + i) for i in range(20)])
        read_all(consumer)
    assert int(consumer.read(1).checkpoint.split(":")[0]) > 1    # the first segment is gone
    assert deleted_files_held_open(queue_path) == []


def deleted_files_held_open(prefix):
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:       # the descriptor listdir used
            pass
    return [path for path in held if path.startswith(prefix) and path.endswith(" (deleted)")]


def test_segments_are_sealed_even_when_the_consumer_never_catches_up(queue_path):
    queue = FileQueue(queue_path, segment_bytes=1000)
    consumer = queue.consumer()
    seen = []
    for round_number in range(40):
        queue.append([line(round_number * 100 + i) for i in range(10)])
        batch = consumer.read(8)            # always behind the writers
        seen.extend(batch.items)
        consumer.acknowledge(batch)
    backlog = 40 * 10 - len(seen)
    assert queue.size() == backlog
    sealed = [name for name in os.listdir(os.path.dirname(queue_path))
              if name.split(".")[-1].isdigit()]
    assert 1 <= len(sealed) <= backlog * 40 // 1000 + 2     # only the unread ones are kept
    restarted = FileQueue(queue_path, segment_bytes=1000)
    consumer.close()
    assert len(read_all(restarted.consumer(batch.checkpoint))) == backlog


def test_restart_after_rotation_resumes_in_the_sealed_segment(queue_path):
    queue = FileQueue(queue_path, segment_bytes=100)
    queue.append([line(i) for i in range(5)])
    consumer = queue.consumer()
    batch = consumer.read(5)
    consumer.acknowledge(batch)           # rotates: everything in the segment is stored
    queue.append([line(i) for i in range(5, 8)])
    consumer.close()
    # the store still holds the checkpoint into the old, now sealed segment
    restarted = FileQueue(queue_path, segment_bytes=100).consumer(batch.checkpoint)
    assert restarted.read(100).items == [line(i)[:-1] for i in range(5, 8)]


def consumed_up_to(queue, count, checkpoint=None):
    """Read and acknowledge up to count lines from checkpoint, as a processor would; its new checkpoint."""
    consumer = queue.consumer(checkpoint)
    while count > 0 and (batch := consumer.read(min(count, 2))).items:
        count -= len(batch.items)
        consumer.acknowledge(batch)
        checkpoint = batch.checkpoint
    consumer.close()
    return checkpoint


def test_a_fresh_store_reads_sealed_segments_before_the_active_one(queue_path):
    queue = FileQueue(queue_path, segment_bytes=100)
    checkpoint = None
    for round_number in range(3):           # segments 0-2 filled, read and reclaimed
        queue.append([line(round_number * 10 + i) for i in range(40, 45)])
        checkpoint = consumed_up_to(queue, 5, checkpoint)
    queue.append([line(i) for i in range(140, 145)])
    consumed_up_to(queue, 2, checkpoint)    # rotates: segment 3 is sealed half read
    queue.append([line(i) for i in range(145, 148)])
    assert not os.path.exists(queue_path + ".0") and os.path.exists(queue_path + ".3")
    # the database was deleted: its next processor starts without a checkpoint
    assert read_all(queue.consumer(None)) == [line(i)[:-1] for i in range(140, 148)]


def test_a_checkpoint_into_a_reclaimed_segment_reads_the_oldest_line_kept(queue_path):
    queue = FileQueue(queue_path, segment_bytes=100)
    queue.append([line(i) for i in range(5)])
    restored = consumed_up_to(queue, 3)     # a backup of the database taken here, in segment 0
    queue.append([line(i) for i in range(5, 10)])
    consumed_up_to(queue, 100, restored)    # later batches went on and reclaimed segment 0
    queue.append([line(i) for i in range(10, 12)])
    assert not os.path.exists(queue_path + ".0")
    # what the later batches read is gone with its segments: the restored store cannot have it
    assert read_all(queue.consumer(restored)) == [line(i)[:-1] for i in range(10, 12)]


def test_a_checkpoint_still_in_the_queue_resumes_there_after_a_restore(queue_path):
    queue = FileQueue(queue_path)
    queue.append([line(i) for i in range(5)])
    restored = consumed_up_to(queue, 3)
    queue.append([line(i) for i in range(5, 7)])
    consumed_up_to(queue, 100, restored)
    assert read_all(queue.consumer(restored)) == [line(i)[:-1] for i in range(3, 7)]


def test_a_checkpoint_from_another_queue_reads_this_one_from_its_start(tmp_path, queue_path):
    old = FileQueue(str(tmp_path / "old.jsonl"))
    old.append([line(i) for i in range(100, 140)])
    moved = consumed_up_to(old, 30)         # the database moves to a machine with a new queue
    queue = FileQueue(queue_path)
    queue.append([line(i) for i in range(40)])
    # the new queue holds the old offset too: only the fingerprint tells them apart
    assert os.path.getsize(queue_path) > int(moved.split(":")[1])
    assert read_all(queue.consumer(moved)) == [line(i)[:-1] for i in range(40)]


def test_a_checkpoint_without_a_fingerprint_is_still_followed(queue_path):
    queue = FileQueue(queue_path)
    queue.append([line(i) for i in range(5)])
    offset = len(b"".join(line(i) for i in range(3)))
    assert read_all(queue.consumer(f"0:{offset}:3")) == [line(i)[:-1] for i in range(3, 5)]


def test_a_checkpoint_without_a_fingerprint_past_the_end_of_the_queue_reads_it_from_the_start(queue_path):
    queue = FileQueue(queue_path)
    queue.append([line(i) for i in range(3)])       # a new queue, shorter than the old one was
    assert read_all(queue.consumer("0:5000:40")) == [line(i)[:-1] for i in range(3)]


def in_a_child(action):
    """action()'s result, run in a forked child process, whose limits it may lower."""
    context = multiprocessing.get_context("fork")
    results = context.SimpleQueue()
    process = context.Process(target=lambda: results.put(action()))
    process.start()
    process.join(60)
    assert process.exitcode == 0
    return results.get()


def in_a_child_that_may_not_write_past(limit, action):
    """action()'s result, run in a child process that may not write past byte limit of any file.

    As on a disk that fills up: a write across the limit is cut short there and
    the next one fails (EFBIG here, ENOSPC there), with no root needed. The
    signal that would kill the child at the limit is ignored, as the error is
    what a full disk gives.
    """
    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return action()

    return in_a_child(limited)


def appended_or_error(queue_path, lines):
    try:
        FileQueue(queue_path).append(lines)
    except QueueUnavailable as error:
        return str(error)
    return "appended"


@pytest.mark.parametrize("tail,end_known,kept", [
    (b"", True, b""),
    (b'{"n":2,"pa', True, b""),                     # a dead writer's fragment is cut off first
    (b'{"n":2,"pa', False, b'{"n":2,"pa'),          # where the last whole write ended is not known
], ids=["after a whole write", "after a dead writer's fragment", "after a fragment, the end unknown"])
def test_an_append_cut_short_by_a_full_disk_leaves_the_queue_as_it_was(
        queue_path, tail, end_known, kept):
    queue = FileQueue(queue_path)
    queue.append([line(1)])
    if not end_known:
        forget_where_whole_writes_end(queue_path)
    killed_mid_write(queue_path, tail)
    batch = [line(i) for i in range(10, 30)]
    room_for_half = os.path.getsize(queue_path) + len(b"".join(batch)) // 2

    error = in_a_child_that_may_not_write_past(room_for_half, lambda: appended_or_error(queue_path, batch))

    assert error == "cannot write to the queue: File too large"
    assert open(queue_path, "rb").read() == line(1) + kept
    assert queue.size() == 1
    queue.append([line(3)])         # a fragment kept is ended first: a line of its own
    assert queue.consumer().read(100).items == [line(1)[:-1]] + ([kept] if kept else []) + [line(3)[:-1]]


def page_views(path, count):
    return [{"site_id": "s", "event_type": "page_view", "path": path} for _ in range(count)]


def test_a_batch_cut_short_by_a_full_disk_is_not_stored_and_its_retry_is_stored_once(config, drain):
    client = create_app(config).test_client()
    assert client.post("/events", json=page_views("/before", 4)).status_code == 200
    queued = os.path.getsize(config.queue_path)
    room_for_five_and_a_half_lines = queued + queued * 11 // 8     # "/failed" lines are as long

    status = in_a_child_that_may_not_write_past(
        room_for_five_and_a_half_lines,
        lambda: client.post("/events", json=page_views("/failed", 20)).status_code)

    assert status == 503
    assert_nothing_but_its_retry_is_stored(client, drain, config, "/failed")


def assert_nothing_but_its_retry_is_stored(client, drain, config, path):
    """Of a batch of 20 page views of path that was not acknowledged, after 4 of /before that were,
    nothing is stored, and the client's retry is stored once."""
    drain()
    assert client.get("/stats?site_id=s").get_json()["top_paths"] == [{"path": "/before", "views": 4}]
    assert client.post("/events", json=page_views(path, 20)).status_code == 200   # the retry
    drain()
    assert client.get("/stats?site_id=s").get_json()["top_paths"] == [
        {"path": path, "views": 20}, {"path": "/before", "views": 4}]
    assert not os.path.exists(config.dead_letter_path)


def test_a_consumer_that_ran_out_of_descriptors_lets_go_of_the_queue_for_its_next_try(queue_path):
    """The processor retries a start that failed; it kept its claim on the queue all the same, and
    its retry stopped it with "another processor is already consuming"."""
    FileQueue(queue_path).append([line(1)])

    def claim_with_one_descriptor_left_then_retry():
        queue = FileQueue(queue_path)
        limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest_free = os.open(os.devnull, os.O_RDONLY)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + 1, limits[1]))
        try:
            queue.consumer()
        except OSError as error:
            failed = error.strerror
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        return failed, queue.consumer().read(10).items

    assert in_a_child(claim_with_one_descriptor_left_then_retry) == ("Too many open files", [line(1)[:-1]])


def test_the_consumer_never_reads_a_write_that_may_still_be_cut_back(queue_path):
    queue = FileQueue(queue_path)
    queue.append([line(1)])
    consumer = queue.consumer()
    consumer.acknowledge(consumer.read(10))
    writers_lock = os.open(queue_path + ".lock", os.O_RDWR)
    fcntl.flock(writers_lock, fcntl.LOCK_EX)        # a writer is appending a batch ...
    size = os.path.getsize(queue_path)
    with open(queue_path, "ab") as file:
        file.write(line(2) + b'{"n":3,')
    with ThreadPoolExecutor(1) as reader:
        read = reader.submit(consumer.read, 10)
        with pytest.raises(TimeoutError):
            read.result(timeout=0.5)                # the consumer waits for the writer ...
        os.truncate(queue_path, size)               # ... whose write the full disk cut short
        fcntl.flock(writers_lock, fcntl.LOCK_UN)
        assert read.result(timeout=10).items == []
    os.close(writers_lock)
    queue.append([line(4)])
    assert consumer.read(10).items == [line(4)[:-1]]


def batch_of(numbers):
    return b"".join(line(i) for i in numbers)


DEAD_WRITES = {     # what a writer killed before recording its write's end left
    "mid-line": batch_of(range(140, 150))[:400],
    "at a line boundary": batch_of(range(140, 146)),
}


@pytest.mark.parametrize("dead", DEAD_WRITES.values(), ids=DEAD_WRITES.keys())
def test_a_batch_whose_writer_died_mid_write_is_never_read_and_the_next_append_cuts_it_off(
        queue_path, dead):
    queue = FileQueue(queue_path)
    queue.append([line(i) for i in range(3)])
    acknowledged = open(queue_path, "rb").read()
    killed_mid_write(queue_path, dead)

    consumer = FileQueue(queue_path).consumer()     # a processor started now counts what it will read
    assert queue.size() == 3
    assert read_all(consumer) == [line(i)[:-1] for i in range(3)]
    queue.append([line(3)])
    assert open(queue_path, "rb").read() == acknowledged + line(3)
    assert read_all(consumer) == [line(3)[:-1]]
    assert queue.size() == 0


def test_a_dead_writers_bytes_are_not_sealed_into_a_segment(queue_path):
    queue = FileQueue(queue_path, segment_bytes=200)
    queue.append([line(i) for i in range(3)])
    acknowledged = open(queue_path, "rb").read()
    consumer = queue.consumer()
    killed_mid_write(queue_path, batch_of(range(140, 150))[:-5])     # fills the segment
    batch = consumer.read(100)
    assert batch.items == [line(i)[:-1] for i in range(3)]
    consumer.acknowledge(batch)                     # seals the segment
    assert open(queue_path + ".0", "rb").read() == acknowledged
    killed_mid_write(queue_path, line(150)[:9])     # into the new segment, before any whole write
    queue.append([line(3)])
    assert read_all(consumer) == [line(3)[:-1]]
    assert open(queue_path, "rb").read() == line(3)


def test_a_batch_whose_api_worker_died_mid_write_is_not_stored_and_its_retry_is_stored_once(
        config, drain):
    client = create_app(config).test_client()
    assert client.post("/events", json=page_views("/before", 4)).status_code == 200
    killed = b"".join(encode_event(validate_event(event)) for event in page_views("/killed", 20))
    killed_mid_write(config.queue_path, killed[:len(killed) // 2])
    assert_nothing_but_its_retry_is_stored(client, drain, config, "/killed")


def zero(path):
    with open(path, "r+b") as file:
        file.write(bytes(os.path.getsize(path)))


@pytest.mark.parametrize("replace", [os.remove, zero], ids=["deleted", "zeroed"])
def test_a_state_file_replaced_while_writers_run_never_gets_an_acknowledged_write_cut_off(
        queue_path, replace):
    started_before = FileQueue(queue_path)      # an API worker keeps the state file it mapped
    started_before.append([line(0)])
    replace(queue_path + ".state")
    killed_mid_write(queue_path, b'{"n":99,')   # where whole writes end is not known now
    started_since = FileQueue(queue_path)
    for i in range(1, 7):
        (started_since if i % 2 else started_before).append([line(i)])
    # the fragment is ended as a line of its own, as before; nothing else is cut or left unread
    assert read_all(FileQueue(queue_path).consumer()) == (
        [line(0)[:-1], b'{"n":99,'] + [line(i)[:-1] for i in range(1, 7)])


def test_where_whole_writes_ended_before_the_machine_restarted_cuts_nothing(queue_path):
    queue = FileQueue(queue_path)
    queue.append([line(0)])
    # a power cut: lines 1-3 were synced, the memory-mapped record of where they end was not
    killed_mid_write(queue_path, batch_of(range(1, 4)))
    with open(queue_path + ".lock", "r+b") as lock:
        lock.write(struct.pack("<Q", 12345))    # the boot the record is from
    FileQueue(queue_path).append([line(4)])
    assert read_all(FileQueue(queue_path).consumer()) == [line(i)[:-1] for i in range(5)]


def append_as_the_previous_version(queue_path, lines):
    """Append as a writer of the previous version did, recording where its write ended in the
    state file only (40 bytes: appended, consumed, end, the consumer's position)."""
    lock = os.open(queue_path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        with open(queue_path, "ab") as file:
            file.write(b"".join(lines))
            end = file.tell()
        with open(queue_path + ".state", "r+b") as state:
            (appended,) = struct.unpack("<Q", state.read(8))
            state.seek(0)
            state.write(struct.pack("<Q", appended + len(lines)))
            state.seek(16)
            state.write(struct.pack("<Q", end))
    finally:
        os.close(lock)


def test_a_queue_of_the_previous_version_keeps_every_acknowledged_event(queue_path):
    with open(queue_path + ".state", "wb") as state:
        state.write(bytes(40))
    append_as_the_previous_version(queue_path, [line(i) for i in range(3)])
    killed_mid_write(queue_path, line(3) + b'{"n":4,')     # kept and ended, as that version did
    queue = FileQueue(queue_path)
    queue.append([line(5)])
    append_as_the_previous_version(queue_path, [line(6)])   # its workers still run (a reload)
    killed_mid_write(queue_path, b'{"n":7,')    # past line 6, whose end only the state file has
    queue.append([line(8)])
    append_as_the_previous_version(queue_path, [line(9)])
    queue.append([line(10)])
    assert read_all(queue.consumer()) == (
        [line(i)[:-1] for i in range(4)] + [b'{"n":4,', line(5)[:-1], line(6)[:-1], b'{"n":7,']
        + [line(i)[:-1] for i in range(8, 11)])
    assert queue.size() == 0


def append_as_a_version_without_whole_ends(queue_path, lines):
    """Append as writers did before the queue recorded where whole writes end: under the lock,
    counting the lines in the state file (then 16 bytes: appended, consumed) and nothing else."""
    lock = os.open(queue_path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        with open(queue_path, "ab") as file:
            file.write(b"".join(lines))
        with open(queue_path + ".state", "r+b") as state:
            (appended,) = struct.unpack("<Q", state.read(8))
            state.seek(0)
            state.write(struct.pack("<Q", appended + len(lines)))
    finally:
        os.close(lock)


def test_lines_of_a_version_without_whole_ends_are_read_and_never_cut_off(queue_path):
    """Such a version rolled back to (or its workers still finishing during a reload) writes
    after this one: its acknowledged lines lie past the end this one recorded."""
    queue = FileQueue(queue_path)
    queue.append([line(0)])
    consumer = FileQueue(queue_path).consumer()
    assert read_all(consumer) == [line(0)[:-1]]
    append_as_a_version_without_whole_ends(queue_path, [line(1), line(2)])
    assert queue.size() == 2
    assert read_all(consumer) == [line(1)[:-1], line(2)[:-1]]
    append_as_a_version_without_whole_ends(queue_path, [line(3)])
    queue.append([line(4)])
    assert read_all(consumer) == [line(3)[:-1], line(4)[:-1]]
    assert queue.size() == 0


FILL_THE_DISK = """
import sys
full = sys.argv[1]

def fill_the_disk():
    with open(full + "/filler", "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(bytes(4096))
        except OSError:         # ENOSPC
            pass
"""


def run_on_a_full_disk(tmp_path, code):
    """Run Python code in a child in which the directory `full` is a small file system of its own.

    The code finds its path in sys.argv[1] and calls fill_the_disk() when no
    space should be left. The tmpfs is mounted in a user namespace, so no
    root is needed; where those are not allowed, the test is skipped.
    """
    full = tmp_path / "full"
    full.mkdir()
    mount_and_run = ["unshare", "--user", "--map-root-user", "--mount",
                     "sh", "-c", 'mount -t tmpfs -o size=256k tmpfs "$0" && exec "$@"', str(full)]
    probe = subprocess.run(mount_and_run + ["true"], capture_output=True, text=True) \
        if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot mount a small file system in a user namespace "
                    f"({probe and probe.stderr.strip()}): to enable, install util-linux's unshare and "
                    "allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1), "
                    "or run the tests as root")
    return subprocess.run(mount_and_run + [sys.executable, "-c", FILL_THE_DISK + textwrap.dedent(code),
                                           str(full)],
                          cwd=REPOSITORY, capture_output=True, text=True, timeout=60)


def test_an_append_on_a_disk_too_full_for_the_state_file_is_unavailable_not_a_crash(tmp_path):
    child = run_on_a_full_disk(tmp_path, """
        from shared_queue import FileQueue, QueueUnavailable
        queue_path = full + "/event_queue.jsonl"
        with open(queue_path, "wb") as file:
            file.write(b'{"n":1}\\n')     # queued before the state file was lost
        fill_the_disk()
        try:
            FileQueue(queue_path).append([b'{"n":2}\\n'])
        except QueueUnavailable as error:
            print(error)
        print(open(queue_path, "rb").read())
    """)
    assert child.returncode == 0, child.stderr
    assert child.stdout.splitlines() == ["cannot write to the queue: No space left on device",
                                         repr(b'{"n":1}\n')]


@pytest.mark.parametrize("unsupported", [errno.EOPNOTSUPP, errno.EINVAL])
def test_where_blocks_cannot_be_reserved_they_are_written_keeping_what_the_file_holds(
        tmp_path, monkeypatch, unsupported):
    def posix_fallocate(fd, offset, length):
        raise OSError(unsupported, os.strerror(unsupported))
    monkeypatch.setattr(shared_queue.os, "posix_fallocate", posix_fallocate)
    path = tmp_path / "counters"
    path.write_bytes(b"held")

    os.close(open_for_mapping(str(path), 64 * 1024))

    assert path.read_bytes() == b"held" + bytes(64 * 1024 - 4)
    assert os.stat(path).st_blocks * 512 >= 64 * 1024      # written, not sparse


@pytest.mark.parametrize("backend", ["redis+sqlite"])
def test_a_redis_that_lost_its_data_is_consumed_again(config):
    """Redis restarted without its data (or the key deleted) under a running processor."""
    queue = open_queue(config)
    processor = Processor(queue, open_store(config), config)
    processor.start()                                # its consumer group made
    queue.client.delete(queue.stream)                # what a restart without data leaves
    queue.append([encode_event(validate_event({"site_id": "s", "event_type": "page_view"}))])
    assert processor.step() == 1
    processor.close()
    store = open_store(config)
    assert store.connection.execute("SELECT count(*) FROM events").fetchone()[0] == 1
    store.close()


def test_a_processor_that_cannot_reach_redis_at_start_says_it_is_redis(config):
    """Its line at start, "cannot start yet: ...", read "Error 111 connecting to 127.0.0.1:1."
    without naming Redis or the queue."""
    unreachable = config.with_overrides(queue_url="redis://127.0.0.1:1/0?stream=nowhere")
    processor = Processor(open_queue(unreachable), open_store(config), config)
    with pytest.raises(QueueUnavailable, match="^cannot reach Redis: "):
        processor.start()
    processor.close()


def numbered_events(numbers):
    return [encode_event(validate_event({"site_id": "s", "event_type": "page_view", "user_id": f"u{n}"}))
            for n in numbers]


def read_and_die(config, count):
    """A processor that read a batch and was killed before it stored it."""
    open_queue(config).consumer().read(count)
    os._exit(0)


@pytest.mark.parametrize("backend", ["redis+sqlite"])
def test_a_batch_whose_processor_died_is_stored_whatever_the_others_trimmed_meanwhile(
        config, drain, monkeypatch):
    import redis_queue
    monkeypatch.setattr(redis_queue, "FORGET_CONSUMER_MS", 0)    # the dead processor is long gone
    queue = open_queue(config)
    queue.append(numbered_events(range(3)))
    dead = multiprocessing.get_context("fork").Process(target=read_and_die, args=(config, 3))
    dead.start()
    dead.join(60)
    queue.append(numbered_events(range(3, 5)))
    settings = config.with_overrides(claim_idle=3600)
    processor = Processor(open_queue(settings), open_store(settings), settings)
    processor.start()
    assert processor.step() == 2        # the two new events
    assert processor.step() == 0        # nothing it may take: it trims the stream it drained
    processor.close()
    drain(claim_idle=0)                 # takes over the dead processor's batch
    stored = sqlite3.connect(config.database_path).execute("SELECT user_id FROM events").fetchall()
    assert sorted(user for (user,) in stored) == [f"u{n}" for n in range(5)]


@pytest.mark.parametrize("backend", ["redis+sqlite"])
def test_entries_another_consumer_group_has_not_read_are_kept_when_the_stream_is_trimmed(config, drain):
    queue = open_queue(config)
    queue.append(numbered_events(range(3)))
    queue.client.xgroup_create(queue.stream, "archive", id="0")
    drain()
    [(_, entries)] = queue.client.xreadgroup("archive", "archiver", {queue.stream: ">"})
    assert len(entries) == 3


@pytest.mark.parametrize("operator", [os.remove, lambda path: open(path, "wb").close()],
                         ids=["deleted", "emptied"])
def test_a_queue_file_deleted_or_emptied_while_the_consumer_runs_is_read_from_its_start(
        queue_path, operator):
    queue = FileQueue(queue_path)
    queue.append([line(i) for i in range(5)])
    consumer = queue.consumer()
    assert len(read_all(consumer)) == 5
    operator(queue_path)
    FileQueue(queue_path).append([line(i) for i in range(5, 8)])    # an API process started since
    queue.append([line(8)])
    assert read_all(consumer) == [line(i)[:-1] for i in range(5, 9)]
    assert queue.size() == 0


def test_a_queue_whose_file_cannot_be_opened_again_closes_no_descriptor_it_gave_up(tmp_path):
    # Between closing the old segment and opening the new one, another thread (a report's database
    # connection, say) may be given the same descriptor number; an audit hook, which runs just
    # before the queue's open, plays that thread. The child process keeps the hook to itself.
    child = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, shutil, sys
        from shared_queue import FileQueue, QueueUnavailable
        directory = sys.argv[1]
        os.mkdir(directory)
        queue = FileQueue(os.path.join(directory, "event_queue.jsonl"))
        queue.append([b'{"n": 1}\\n'])
        others = []

        def another_thread_opens_a_file(event, args):
            if event == "open" and not others and str(args[0]).endswith("event_queue.jsonl"):
                others.append(os.open(os.devnull, os.O_RDONLY))
        sys.addaudithook(another_thread_opens_a_file)
        shutil.rmtree(directory)          # the queue cannot be opened again
        try:
            queue.append([b'{"n": 2}\\n'])
        except QueueUnavailable as error:
            print("refused:", error)
        os.fstat(others[0])               # closed by the queue: EBADF
        print("the other descriptor is open")
        """), str(tmp_path / "queue")], cwd=REPOSITORY, capture_output=True, text=True, timeout=60)
    assert "refused: cannot write to the queue" in child.stdout, child.stderr
    assert "the other descriptor is open" in child.stdout, child.stderr
