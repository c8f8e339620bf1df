"""Real processes for the integration tests: gunicorn, the processor, and a load generator.

Every child runs from the repository root with the interpreter running the
tests, gets DATA_DIR and nothing else from the outer configuration, and is
started in its own session so that stopping it stops its whole process group.
"""
import errno
import os
import random
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import requests
from requests.adapters import HTTPAdapter

from config import ENVIRONMENT

REPO = Path(__file__).resolve().parent.parent
QUEUE_NAME = "event_queue.jsonl"
START_TIMEOUT = 30.0


def wait_for(predicate, timeout, message, interval=0.02):
    """Poll predicate until it returns something truthy; fail with message at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s: {message}")
        time.sleep(interval)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment(data_dir, **settings):
    """The outer environment minus our settings, plus DATA_DIR and the given settings."""
    env = {name: value for name, value in os.environ.items() if name not in ENVIRONMENT}
    env["DATA_DIR"] = str(data_dir)
    env.update({name: str(value) for name, value in settings.items()})
    return env


def _spawn(args, data_dir, log_name, settings):
    logs = Path(data_dir).parent / "logs"
    logs.mkdir(exist_ok=True)
    # Output goes to files: a full pipe would block a child that logs a lot.
    with open(logs / f"{log_name}.out", "ab") as out, open(logs / f"{log_name}.err", "ab") as err:
        return subprocess.Popen(args, cwd=REPO, env=environment(data_dir, **settings),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)


def stop(process, sig=signal.SIGKILL, timeout=10.0):
    """Send sig to the child's process group and reap it; returns the exit code."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return process.wait(timeout)


def exit_code(process, timeout):
    """The child's exit code, or a test failure if it is still running at the deadline."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{process.args} still running after {timeout:.0f}s") from None


def log_tail(data_dir, log_name, size=2000):
    path = Path(data_dir).parent / "logs" / f"{log_name}.err"
    return path.read_text(errors="replace")[-size:] if path.exists() else ""


def is_healthy(url):
    """Whether the API at url answers /health with 200 now."""
    try:
        return requests.get(url + "/health", timeout=5).status_code == 200
    except requests.RequestException:   # not listening yet, or still booting
        return False


class Api:
    """gunicorn serving ingestion_api:app on a free loopback port."""

    def __init__(self, data_dir, workers=8, **settings):
        self.data_dir = data_dir
        settings.setdefault("RATE_LIMIT", "off")     # the load comes from one address
        for attempt in range(3):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.process = _spawn(
                [sys.executable, "-m", "gunicorn", "-w", str(workers),
                 "-b", f"127.0.0.1:{self.port}", "ingestion_api:app"],
                data_dir, "gunicorn", settings)
            try:
                if self._wait_ready():
                    return
            except BaseException:
                stop(self.process)
                raise
            stop(self.process)      # most likely someone took the port meanwhile
        raise AssertionError("gunicorn did not start:\n" + log_tail(data_dir, "gunicorn"))

    def _wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.process.poll() is None:
            if is_healthy(self.url):
                return True
            time.sleep(0.05)
        return False

    def health(self):
        response = requests.get(self.url + "/health", timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def stats(self, site_id):
        response = requests.get(self.url + "/stats", params={"site_id": site_id}, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def worker_pids(self):
        return [child.pid for child in psutil.Process(self.process.pid).children()]

    def stop(self):
        return stop(self.process)


def start_processor(data_dir, *args, log_name="processor", **settings):
    return _spawn([sys.executable, "processor.py", *args], data_dir, log_name, settings)


def run_processor_once(data_dir, timeout=120, **settings):
    process = start_processor(data_dir, "--once", **settings)
    try:
        code = exit_code(process, timeout)
    finally:
        stop(process)
    assert code == 0, f"processor --once exited {code}:\n" + log_tail(data_dir, "processor")


# -- looking at the data directory directly --------------------------------

def read_db(data_dir, sql, params=()):
    connection = sqlite3.connect(f"file:{Path(data_dir) / 'analytics.db'}?mode=ro", uri=True,
                                 timeout=10)
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


def stored_count(data_dir):
    """Rows in events; 0 before the processor has created the database and its schema."""
    if not (Path(data_dir) / "analytics.db").exists():
        return 0
    try:
        return read_db(data_dir, "SELECT count(*) FROM events")[0][0]
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            return 0
        raise


def duplicated_user_ids(data_dir):
    return read_db(data_dir, "SELECT user_id, count(*) FROM events "
                             "GROUP BY user_id HAVING count(*) > 1 LIMIT 20")


def stored_user_ids(data_dir):
    return {user_id for (user_id,) in read_db(data_dir, "SELECT user_id FROM events")}


def committed_checkpoint(data_dir):
    rows = read_db(data_dir, "SELECT checkpoint FROM queue_checkpoints WHERE queue = ?",
                   (QUEUE_NAME,))
    return rows[0][0] if rows else None


def queue_counters(data_dir):
    """(appended, consumed) as the queue's state file holds them."""
    return struct.unpack("<QQ", (Path(data_dir) / f"{QUEUE_NAME}.state").read_bytes()[:16])


def queue_files(data_dir):
    """Queue segments (the active one and sealed ones) with their sizes."""
    return {path.name: path.stat().st_size for path in Path(data_dir).iterdir()
            if path.name == QUEUE_NAME
            or (path.name.startswith(QUEUE_NAME + ".") and path.name.rsplit(".", 1)[1].isdigit())}


class SmallDisk:
    """A file system of its own (a small tmpfs) mounted at path, for a test to fill up and free.

    Mounting needs root: see the small_disk fixture.
    """

    def __init__(self, path, size="16m"):
        self.path = Path(path)
        self.path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)], check=True)
        self._filler = self.path / "filler"

    def fill(self):
        """Take every byte left, as happens to a disk that fills up."""
        with open(self._filler, "ab", buffering=0) as filler:
            try:
                while True:
                    filler.write(bytes(64 * 1024))
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise

    def free(self):
        self._filler.unlink()

    def unmount(self):
        # lazily: a child that still holds a file of it lets go when it is stopped
        subprocess.run(["umount", "--lazy", str(self.path)], check=True)


# -- load ------------------------------------------------------------------

def session():
    http = requests.Session()
    http.mount("http://", HTTPAdapter(max_retries=0))   # a retried POST could store twice
    return http


class Load:
    """Client threads posting events with unique user_id values until stopped.

    Each request is either POST /event or a POST /events batch. An id is
    acknowledged when its request got a 200, failed when the request got
    anything else or no answer: a failed event may or may not be stored, an
    acknowledged one must be stored exactly once. Bounded by max_events per
    thread and by max_seconds.
    """

    def __init__(self, url, site_id, threads=8, max_events=100_000, max_seconds=60.0,
                 max_batch=30, seed=0):
        self.url = url
        self.site_id = site_id
        self.max_events = max_events
        self.max_batch = max_batch
        self.seed = seed
        self.deadline = time.monotonic() + max_seconds
        self.stopping = threading.Event()
        self.acked, self.failed, self.errors = [], [], []
        self.acked_so_far = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(number,), daemon=True)
                         for number in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, number):
        rng = random.Random(self.seed * 1000 + number)
        http = session()
        acked, failed, sent = [], [], 0
        try:
            while (sent < self.max_events and not self.stopping.is_set()
                   and time.monotonic() < self.deadline):
                size = 1 if rng.random() < 0.5 else rng.randint(1, self.max_batch)
                size = min(size, self.max_events - sent)
                ids = [f"{self.site_id}-{number}-{sent + i}" for i in range(size)]
                events = [{"site_id": self.site_id, "event_type": "page_view",
                           "path": f"/page/{rng.randint(0, 20)}", "user_id": user_id}
                          for user_id in ids]
                sent += size
                try:
                    if size == 1 and rng.random() < 0.8:
                        response = http.post(self.url + "/event", json=events[0], timeout=30)
                    else:
                        response = http.post(self.url + "/events", json=events, timeout=30)
                    ok = response.status_code == 200
                except (requests.RequestException, OSError):   # no answer: maybe stored or not
                    ok = False
                (acked if ok else failed).extend(ids)
                if ok:
                    with self._lock:
                        self.acked_so_far += size
        except BaseException as error:
            self.errors.append(error)
            raise
        finally:
            http.close()
            with self._lock:
                self.acked.extend(acked)
                self.failed.extend(failed)

    def running(self):
        return any(thread.is_alive() for thread in self._threads)

    def finish(self, timeout=60.0):
        """Wait for every thread to reach its limit; returns (acknowledged, failed) ids."""
        for thread in self._threads:
            thread.join(timeout)
        assert not self.running(), "load threads did not finish"
        assert not self.errors, f"a load thread failed: {self.errors[0]!r}"
        return set(self.acked), set(self.failed)

    def stop(self, timeout=60.0):
        self.stopping.set()
        return self.finish(timeout)


def hold_write_lock(database_path):
    """A connection holding a SQLite database's write lock, as rebuild-rollups or a migration's
    fold does for as long as it runs; its rollback() lets go."""
    holder = sqlite3.connect(database_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder
