"""Scaling out: processors on Redis+PostgreSQL, and POST /event on the Redis queue.

    .venv/bin/python bench/scale_bench.py                      full run (~3 minutes), writes bench/SCALE.md
    .venv/bin/python bench/scale_bench.py --events 20000 --rounds 1 --http-seconds 2 --output /tmp/s.md

1. Processors: one stream of N events (the API's own line format) is drained by 1, 2 and 4
   processor.py processes into a fresh PostgreSQL schema; rounds are interleaved (1, 2, 4, 1, 2, 4,
   ...) and medians taken. The rate is the steady one, from 10% to 90% of the events stored (read
   from the rollup counters, which commit with the rows), so start-up and the last lone batch do
   not count. While it runs, the CPU of every process on the machine is sampled (processors,
   PostgreSQL, Redis, the rest) and PostgreSQL is asked who waits on a lock.
2. POST /event requests/s under gunicorn (gunicorn.conf.py settings) with wrk: the Redis queue
   against the file queue, one server of each, rounds interleaved.

Needs PostgreSQL on 127.0.0.1:5432 (database test) and Redis on 127.0.0.1:6379, as the tests do.
Everything started here listens on 127.0.0.1, runs in its own process group and is stopped here;
the schemas and stream keys it creates are dropped at the end.
"""
import argparse
import os
import platform
import random
import re
import runpy
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from importlib.metadata import version
from pathlib import Path

import psutil
import psycopg
import redis
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from events import encode_event, validate_event  # noqa: E402
from harness import NEVER_REACHED  # noqa: E402
from postgres_store import SHARDS, PostgresStore  # noqa: E402
from redis_queue import RedisQueue  # noqa: E402

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"
PROCESSORS = (1, 2, 4)
TARGET_2_VS_1 = 1.4
EVENT_BODY = ('{"site_id":"bench-load","event_type":"page_view","path":"/blog/2025/01/counting-visitors",'
              '"user_id":"u-7f3a9c2e51","timestamp":"2025-01-31T12:00:00Z"}')


def log(message):
    print(message, flush=True)


def median(values):
    return statistics.median(values) if values else float("nan")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate, timeout, message, interval=0.05):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"benchmark failed: {message} within {timeout:.0f}s")
        time.sleep(interval)


def spawn(args, env, log_path):
    with open(log_path, "ab") as out:
        return subprocess.Popen(args, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(process, sig=signal.SIGTERM, timeout=30):
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait(timeout)


def base_environment(data_dir, **settings):
    """The outer environment without the application's settings, plus ours."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("QUEUE_URL", "DATABASE_URL", "API_KEYS", "API_KEYS_FILE", "PROCESSOR_BATCH_SIZE")}
    env.update(DATA_DIR=str(data_dir), **{name: str(value) for name, value in settings.items()})
    return env


# -- where the CPU goes ------------------------------------------------------------

class CpuSnapshot:
    """CPU seconds of every process on the machine, by kind, and of the machine as a whole.

    ours maps pids to a kind of our own (the processors, and the PostgreSQL backends serving them).
    """

    def __init__(self, ours):
        self.time = time.monotonic()
        machine = psutil.cpu_times()
        self.machine_busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq
        self.processes = {}
        for process in psutil.process_iter(["pid", "ppid", "name", "cpu_times", "create_time"]):
            info = process.info
            if info["cpu_times"] is None:
                continue
            seconds = info["cpu_times"].user + info["cpu_times"].system
            self.processes[(info["pid"], info["create_time"])] = (kind(info, ours), seconds)


def kind(info, ours):
    if info["pid"] in ours:
        return ours[info["pid"]]
    if info["name"] in ("postgres", "postmaster"):
        return "postgres"
    if info["name"] == "redis-server":
        return "redis"
    if info["pid"] == os.getpid():
        return "benchmark"
    if info["pid"] == 2 or info["ppid"] == 2:
        return "kernel threads"
    return "other"


def backends_of(processes, connection):
    """The PostgreSQL backend pids serving these processes, matched by client port."""
    ports = set()
    for process in processes:
        try:
            ports |= {c.laddr.port for c in psutil.Process(process.pid).net_connections("tcp")
                      if c.raddr and c.raddr.port == 5432}
        except psutil.NoSuchProcess:
            pass
    return {pid for pid, port in connection.execute(
        "SELECT pid, client_port FROM pg_stat_activity WHERE client_port IS NOT NULL").fetchall()
        if port in ports}


def cores_between(first, last):
    """Cores used per kind between two snapshots (processes seen in both)."""
    elapsed = last.time - first.time
    used = {}
    for key, (name, seconds) in last.processes.items():
        if key in first.processes:
            used[name] = used.get(name, 0.0) + seconds - first.processes[key][1]
    cores = {name: seconds / elapsed for name, seconds in used.items()}
    cores["machine"] = (last.machine_busy - first.machine_busy) / elapsed
    return cores


# -- processors draining one stream ----------------------------------------------

def generated_lines(count, seed=5):
    """count events as the API queues them: a day of traffic in time order, returning visitors."""
    rng = random.Random(seed)
    start = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(days=1)
    sites = [f"site-{n}" for n in range(5)]
    paths = ["/"] + [f"/page/{n}" for n in range(199)]
    lines = []
    for n in range(count):
        moment = start + timedelta(seconds=86_400 * n / count)
        lines.append(encode_event(validate_event({
            "site_id": rng.choice(sites),
            "event_type": "page_view" if rng.random() < 0.9 else "signup",
            "path": paths[min(int(rng.paretovariate(1.2)) - 1, len(paths) - 1)],
            "user_id": f"user-{int(rng.paretovariate(0.6)) % 40_000}",
            "timestamp": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"})))
    return lines


class Scale:
    def __init__(self, args, work):
        self.args = args
        self.work = work
        self.redis = redis.Redis.from_url(REDIS)
        self.prefix = f"scale-bench:{uuid.uuid4().hex[:8]}"
        self.template = f"{self.prefix}:template"
        self.schemas = []
        self.runs = []         # one dict per drained stream

    def fill_template(self):
        lines = generated_lines(self.args.events)
        queue = RedisQueue(f"{REDIS}?stream={self.template}")
        for start in range(0, len(lines), 2000):
            queue.append(lines[start:start + 2000])
        queue.close()
        self.line_bytes = sum(map(len, lines)) / len(lines)

    def fresh_schema(self):
        schema = f"scale_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(POSTGRES, autocommit=True) as admin:
            admin.execute(f"CREATE SCHEMA {schema}")
        self.schemas.append(schema)
        url = f"{POSTGRES}?options=-csearch_path%3D{schema}"
        store = PostgresStore(url)
        store.migrate()
        store.close()
        return url

    def drain(self, count, number):
        """Start count processors on a copy of the template stream; measure until it is drained."""
        stream = f"{self.prefix}:run-{number}"
        self.redis.copy(self.template, stream)
        database_url = self.fresh_schema()
        queue_url = f"{REDIS}?stream={stream}"
        events = self.args.events
        data_dir = self.work / f"run-{number}"
        data_dir.mkdir()
        settings = {"QUEUE_URL": queue_url, "DATABASE_URL": database_url}
        if self.args.batch_size:
            settings["PROCESSOR_BATCH_SIZE"] = self.args.batch_size
        processes = []
        for slot in range(count):
            env = base_environment(data_dir, PROCESSOR_LOG_FILE=data_dir / f"processor-{slot}.log",
                                   **settings)
            processes.append(spawn([sys.executable, "processor.py"], env, data_dir / f"processor-{slot}.out"))
        ours = {process.pid: "processors" for process in processes}
        watcher = psycopg.connect(database_url, autocommit=True)
        try:
            started = time.monotonic()
            samples, lock_samples, waits = [], [], {}
            snapshots = {}
            while True:
                stored = watcher.execute(
                    "SELECT CAST(coalesce(sum(events), 0) AS BIGINT) FROM site_totals").fetchone()[0]
                now = time.monotonic()
                samples.append((now, stored))
                for mark in (0.1, 0.9):
                    if mark not in snapshots and stored >= mark * events:
                        if mark == 0.1:
                            ours.update(dict.fromkeys(backends_of(processes, watcher), "their backends"))
                        snapshots[mark] = (now, stored, CpuSnapshot(ours))
                if 0.1 in snapshots and 0.9 not in snapshots:
                    active = watcher.execute(
                        "SELECT wait_event_type, wait_event, query FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid != pg_backend_pid() "
                        "AND state = 'active'").fetchall()
                    waiting = [(event, query) for event_type, event, query in active if event_type == "Lock"]
                    lock_samples.append((len(waiting), len(active)))
                    for event, query in waiting:
                        table = re.search(r"INSERT INTO (\w+)", query)
                        key = (f"{event} in INSERT INTO {table.group(1)}" if table
                               else f"{event}: {query[:40]}")
                        waits[key] = waits.get(key, 0) + 1
                if stored >= events:
                    break
                dead = [slot for slot, process in enumerate(processes) if process.poll() is not None]
                if dead:
                    log_tail = (data_dir / f"processor-{dead[0]}.out").read_text()[-3000:]
                    raise SystemExit(f"processor {dead[0]} exited with {processes[dead[0]].returncode}; "
                                     f"its output ends:\n{log_tail}")
                if now - started > self.args.drain_timeout:
                    raise SystemExit(f"{count} processors did not drain {events} events in "
                                     f"{self.args.drain_timeout}s; see {data_dir}")
                time.sleep(0.05)
            drained = time.monotonic()
            rows = watcher.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
        finally:
            watcher.close()
            codes = [stop(process) for process in processes]
        if rows != (events, events):
            raise SystemExit(f"stored {rows[0]} rows ({rows[1]} distinct) of {events}: see {data_dir}")
        if any(codes):
            raise SystemExit(f"processors exited with {codes} on SIGTERM; see {data_dir}")
        self.redis.delete(stream)
        self.drop_schemas()
        (t10, n10, cpu10), (t90, n90, cpu90) = snapshots[0.1], snapshots[0.9]
        logs = "".join((data_dir / f"processor-{slot}.log").read_text() for slot in range(count))
        first_stored = next(t for t, n in samples if n > 0)
        run = {
            "processors": count,
            "rate": (n90 - n10) / (t90 - t10),
            "wall_rate": events / (drained - first_stored),
            "seconds": drained - started,
            "cpu": cores_between(cpu10, cpu90),
            "lock_waiting": (sum(waiting for waiting, _ in lock_samples) / len(lock_samples)
                             if lock_samples else 0.0),
            "active": sum(active for _, active in lock_samples) / len(lock_samples) if lock_samples else 0.0,
            "deadlocks": logs.count("deadlock detected"),
            "failed_batches": logs.count("batch failed"),
            "shards": sorted(process.pid % SHARDS for process in processes),
            "waits": sorted(waits.items(), key=lambda item: -item[1])[:3],
            "samples": len(lock_samples),
        }
        self.runs.append(run)
        shutil.rmtree(data_dir, ignore_errors=True)
        log(f"  {count} processor(s): {run['rate']:,.0f} events/s steady, {run['wall_rate']:,.0f}/s "
            f"first row to drained; cores {format_cores(run['cpu'])}; backends waiting on a lock "
            f"{run['lock_waiting']:.2f}; failed batches {run['failed_batches']} "
            f"(deadlocks {run['deadlocks']}); shards {run['shards']}")
        return run

    def drop_schemas(self):
        with psycopg.connect(POSTGRES, autocommit=True) as admin:
            while self.schemas:
                admin.execute(f"DROP SCHEMA IF EXISTS {self.schemas.pop()} CASCADE")

    def cleanup(self):
        for key in self.redis.scan_iter(f"{self.prefix}:*"):
            self.redis.delete(key)
        self.drop_schemas()
        self.redis.close()


def format_cores(cores):
    order = ("processors", "their backends", "postgres", "redis", "other", "machine")
    return ", ".join(f"{name} {cores.get(name, 0.0):.2f}" for name in order)


# -- POST /event: Redis queue against file queue ---------------------------------

class Server:
    """gunicorn serving the API from the repository root, so gunicorn.conf.py applies."""

    def __init__(self, name, data_dir, **settings):
        self.name = name
        self.port = free_port()
        env = base_environment(data_dir, HOST="127.0.0.1", PORT=self.port, RATE_LIMIT=NEVER_REACHED,
                               **settings)
        self.process = spawn([sys.executable, "-m", "gunicorn", "ingestion_api:app"], env,
                             data_dir.parent / f"gunicorn-{name}.log")

        def ready():
            if self.process.poll() is not None:
                raise SystemExit(f"gunicorn {name} exited at start; see {data_dir.parent}")
            try:
                return requests.get(f"{self.url}/health", timeout=2).status_code == 200
            except requests.RequestException:
                return False
        wait_for(ready, 30, f"gunicorn {name} did not answer")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def processes(self):
        try:
            root = psutil.Process(self.process.pid)
            return [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def cpu_seconds(processes):
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def redis_server_process():
    info = redis.Redis.from_url(REDIS).info("server")
    return psutil.Process(info["process_id"])


def wrk(url, script, seconds, threads, connections):
    done = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
                           "-s", str(script), url], capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0 or "Requests/sec" not in done.stdout:
        raise SystemExit(f"wrk failed: {done.stderr or done.stdout}")
    out = done.stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
              "requests": int(re.search(r"(\d+) requests in", out).group(1))}
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["bad"] = (int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors else 0)
    return result


def ensure_wrk():
    if shutil.which("wrk"):
        return
    log("wrk is missing: apt-get install -y wrk")
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], stdout=subprocess.DEVNULL, check=False)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed and `apt-get install -y wrk` failed")


def http_rounds(args, work):
    script = work / "post_event.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = '{EVENT_BODY}'\n")
    stream = f"scale-bench:{uuid.uuid4().hex[:8]}:http"
    servers = {}
    results = {"file": [], "redis": []}
    try:
        for name, settings in (("file", {}), ("redis", {"QUEUE_URL": f"{REDIS}?stream={stream}"})):
            data_dir = work / f"http-{name}"
            data_dir.mkdir()
            servers[name] = Server(name, data_dir, **settings)
        redis_process = redis_server_process()
        order = ["file", "redis"]
        for round_number in range(args.http_rounds):
            for name in (order if round_number % 2 == 0 else order[::-1]):
                server = servers[name]
                wrk(server.url + "/event", script, 1, args.wrk_threads, args.wrk_connections)   # warm-up
                gunicorn_before = cpu_seconds(server.processes())
                redis_before = cpu_seconds([redis_process])
                result = wrk(server.url + "/event", script, args.http_seconds, args.wrk_threads,
                             args.wrk_connections)
                result["gunicorn_us"] = ((cpu_seconds(server.processes()) - gunicorn_before)
                                         / result["requests"] * 1e6)
                result["redis_us"] = (cpu_seconds([redis_process]) - redis_before) / result["requests"] * 1e6
                if result["bad"]:
                    raise SystemExit(f"{name}: {result['bad']} failed requests under load")
                results[name].append(result)
                log(f"  POST /event, {name} queue: {result['rps']:,.0f} requests/s, gunicorn "
                    f"{result['gunicorn_us']:.0f} us CPU per request, redis {result['redis_us']:.0f} us")
    finally:
        for server in servers.values():
            stop(server.process)
        redis.Redis.from_url(REDIS).delete(stream)
    return results


# -- the report ---------------------------------------------------------------------

def machine():
    with psycopg.connect(POSTGRES) as connection:
        postgres = connection.execute("SHOW server_version").fetchone()[0]
        settings = {name: connection.execute(f"SHOW {name}").fetchone()[0]
                    for name in ("shared_buffers", "synchronous_commit", "fsync")}
    info = redis.Redis.from_url(REDIS).info()
    persistence = redis.Redis.from_url(REDIS).config_get("appendonly").get("appendonly")
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[1]
    conf = runpy.run_path(str(REPO / "gunicorn.conf.py"))
    return [
        ("cores (nproc)", os.cpu_count()),
        ("CPU model", model),
        ("memory", f"{psutil.virtual_memory().total / 2**30:.0f} GiB"),
        ("kernel", platform.release()),
        ("Python", platform.python_version()),
        ("PostgreSQL", f"{postgres} (shared_buffers {settings['shared_buffers']}, synchronous_commit "
                       f"{settings['synchronous_commit']}, fsync {settings['fsync']})"),
        ("Redis", f"{info['redis_version']} (appendonly {persistence})"),
        ("redis-py / psycopg", f"{version('redis')} / {version('psycopg')}"),
        ("gunicorn", f"{version('gunicorn')}: {conf['worker_class']} -w {conf['workers']} "
                     f"--threads {conf.get('threads', 1)} (gunicorn.conf.py)"),
        ("wrk", wrk_version),
    ]


def postgres_cores(cpu):
    return cpu.get("their backends", 0.0) + cpu.get("postgres", 0.0)


def limits_text(by_count):
    """What held each configuration back, said from the measurements."""
    cores = os.cpu_count()
    one, two, four = (by_count[count] for count in PROCESSORS)
    lines = []
    for count in PROCESSORS:
        run = by_count[count]
        cpu = run["cpu"]
        waits = "; ".join(f"{name} ({hits / run['samples']:.2f})" for name, hits in run["waits"]) or "none"
        lines.append(
            f"- {count} processor{'s' if count > 1 else ''}: {cpu['machine']:.2f} of {cores} cores busy: "
            f"processors {cpu.get('processors', 0):.2f}, PostgreSQL {postgres_cores(cpu):.2f} (of which "
            f"the processors' own backends {cpu.get('their backends', 0):.2f}), "
            f"Redis {cpu.get('redis', 0):.2f}, "
            f"other processes {cpu.get('other', 0):.2f}. Backends waiting on a lock: "
            f"{run['lock_waiting']:.2f} on average; what they waited for (average waiters): {waits}. "
            f"Failed batches: {run['failed_batches']} (deadlocks {run['deadlocks']}).")
    verdict = []
    if one["cpu"]["machine"] < 0.75 * cores:
        verdict.append(
            f"One processor keeps only {one['cpu']['machine']:.2f} of {cores} cores busy: it and its "
            f"backend take turns (the processor reads, parses and enriches a batch while PostgreSQL "
            f"waits, then PostgreSQL copies and folds it while the processor waits), so a second "
            f"processor has idle CPU to use.")
    busy = two["cpu"]["machine"] / cores
    if busy > 0.85:
        verdict.append(
            f"With 2 processors the machine is {busy:.0%} busy, so the limit is the CPU of this one "
            f"machine: PostgreSQL takes {postgres_cores(two['cpu']):.2f} cores "
            f"({postgres_cores(two['cpu']) / two['cpu']['machine']:.0%} of the busy time) running the "
            f"processors' transactions (COPY, the insert checked against the unique event-id index, "
            f"the rollup upserts), the processors {two['cpu'].get('processors', 0):.2f} (reading, "
            f"parsing, enrichment, COPY encoding), Redis {two['cpu'].get('redis', 0):.2f}.")
    else:
        verdict.append(f"With 2 processors the machine is only {busy:.0%} busy: something other than CPU "
                       f"(lock waits, I/O, round trips) holds them back.")
    if four["rate"] < 1.1 * two["rate"] and four["cpu"]["machine"] > 0.85 * cores:
        verdict.append(f"4 processors find no idle core left, so they store no faster than 2 "
                       f"({four['rate'] / two['rate']:.2f}x): more processors pay off only where there "
                       f"are cores to run them and their backends (or PostgreSQL on a machine of its own).")
    per_event = {count: by_count[count]["cpu"]["machine"] / by_count[count]["rate"] * 1e6
                 for count in PROCESSORS}
    verdict.append("CPU per stored event, whole machine: " + ", ".join(
        f"{per_event[count]:.0f} us with {count}" for count in PROCESSORS)
        + ". Where this stays nearly flat, adding processors adds work in parallel rather than waiting; "
          "the rate is then the cores divided by this cost.")
    worst = max(PROCESSORS, key=lambda count: by_count[count]["lock_waiting"])
    if by_count[worst]["lock_waiting"] > 0.1:
        verdict.append(
            f"Processors do wait on each other: with {worst}, {by_count[worst]['lock_waiting']:.2f} backends "
            f"on average wait on a lock, mostly {by_count[worst]['waits'][0][0]}. A transactionid wait in an "
            f"INSERT ... ON CONFLICT DO NOTHING means the row it inserts was just inserted by another "
            f"processor's open transaction (the unsharded user tables: the same visitor in two concurrent "
            f"batches) and it must wait for that commit.")
    redis_cores = max(run["cpu"].get("redis", 0) for run in by_count.values())
    verdict.append(f"Redis is not the limit: at most {redis_cores:.2f} cores.")
    return lines, verdict


def report(args, machine_rows, by_count, rounds, http, line_bytes, started, elapsed):
    one = by_count[1]["rate"]
    rate_rows = [
        "| processors | events/s (median) | per round | first row to drained (median) | vs 1 | target |",
        "|---|---|---|---|---|---|",
    ]
    for count in PROCESSORS:
        ratio = by_count[count]["rate"] / one
        target = ""
        if count == 2:
            target = f">= {TARGET_2_VS_1}: **{'met' if ratio >= TARGET_2_VS_1 else 'missed'}**"
        per_round = ", ".join(f"{run['rate']:,.0f}" for run in rounds[count])
        wall = median([run["wall_rate"] for run in rounds[count]])
        rate_rows.append(f"| {count} | {by_count[count]['rate']:,.0f} | {per_round} | {wall:,.0f}/s "
                         f"| {ratio:.2f} | {target} |")
    cpu_rows = [
        "| processors | machine busy | processors | their PostgreSQL backends | rest of PostgreSQL | Redis "
        "| other | backends waiting on a lock | failed batches | shards (pid % 16) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for count in PROCESSORS:
        run = by_count[count]
        cpu = run["cpu"]
        cpu_rows.append(
            f"| {count} | {cpu['machine']:.2f} | {cpu.get('processors', 0):.2f} | "
            f"{cpu.get('their backends', 0):.2f} | {cpu.get('postgres', 0):.2f} | "
            f"{cpu.get('redis', 0):.2f} | "
            f"{cpu.get('other', 0):.2f} | {run['lock_waiting']:.2f} | {run['failed_batches']} | "
            f"{', '.join(map(str, run['shards']))} |")
    http_ratio = median([redis_run["rps"] / file_run["rps"]
                         for file_run, redis_run in zip(http["file"], http["redis"])])
    http_rows = [
        "| queue | requests/s (median) | per round | gunicorn CPU per request "
        "| Redis CPU per request | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("file", "redis"):
        runs = http[name]
        ratio = "1.00" if name == "file" else f"{http_ratio:.2f}"
        per_round = ", ".join(f"{run['rps']:,.0f}" for run in runs)
        http_rows.append(f"| {name} | {median([run['rps'] for run in runs]):,.0f} | {per_round} | "
                         f"{median([run['gunicorn_us'] for run in runs]):.0f} us | "
                         f"{median([run['redis_us'] for run in runs]):.0f} us | {ratio} |")
    limit_lines, verdict = limits_text(by_count)
    command = " ".join([".venv/bin/python bench/scale_bench.py", *sys.argv[1:]])
    text = "\n".join([
        "# Scaling out: processors on Redis+PostgreSQL, POST /event on Redis",
        "",
        f"Run on {started:%Y-%m-%d %H:%M} UTC with `{command}` ({elapsed / 60:.1f} minutes), "
        f"code at `{git_head()}`.",
        "",
        "| machine |  |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in machine_rows],
        "",
        "PostgreSQL, Redis, the processors, gunicorn and wrk all share this machine. The Redis on "
        "6379 keeps nothing on disk (no AOF), so its figures leave out the fsync that "
        "`appendfsync always` would add.",
        "",
        f"## Processors draining one stream of {args.events:,} events",
        "",
        f"Each run copies one pre-filled stream ({line_bytes:.0f} bytes a line, made by "
        f"`events.encode_event(events.validate_event(...))`: 5 sites, 200 paths, 40,000 returning "
        f"users, a day of traffic in time order) and 1, 2 or 4 `processor.py` processes drain it into "
        f"a fresh schema, with the default settings (PROCESSOR_BATCH_SIZE {args.batch_size or 10_000:,}). "
        f"events/s is the steady rate, from 10% to 90% of the events stored (read from the rollup "
        f"counters, which commit with the rows), so start-up and the last batch are left out; "
        f"first row to drained is the whole drain. Every run stored exactly {args.events:,} rows, "
        f"each event id once. {args.rounds} interleaved rounds (1, 2, 4, 1, 2, 4, ...); the median "
        f"round of each is shown below.",
        "",
        *rate_rows,
        "",
        f"4 vs 1: {by_count[4]['rate'] / one:.2f}.",
        "",
        "### Where the CPU went, between 10% and 90% stored",
        "",
        "Cores used, from psutil CPU times of every process on the machine at both marks; the "
        "processors' own PostgreSQL backends are told apart by their client ports. Lock waits are "
        "PostgreSQL backends of the database in a Lock wait, sampled every 50 ms.",
        "",
        *cpu_rows,
        "",
        "### What limits it",
        "",
        *limit_lines,
        "",
        *[line + "\n" for line in verdict],
        "## POST /event: Redis queue against file queue",
        "",
        f"One gunicorn per queue from the repository root (so gunicorn.conf.py applies), a DATA_DIR of "
        f"its own, nothing consuming; wrk -t{args.wrk_threads} -c{args.wrk_connections}, one ~150-byte "
        f"event per request, {args.http_seconds} s per round after a 1 s warm-up, {args.http_rounds} "
        f"rounds alternating which queue goes first. Ratio = median of the per-round ratios; CPU per "
        f"request is gunicorn's processes (and Redis's) over the requests answered.",
        "",
        *http_rows,
        "",
        "With Redis each POST /event is one MULTI/XADD/EXEC round trip over loopback instead of a "
        "locked append to a local file (FSYNC=never for the file queue, no AOF for Redis), and the "
        "rate limit counts each request in Redis too (one more round trip; with the file queue it "
        "counts in a shared file). Both servers run the default settings, the rate limit with a "
        "limit the load never reaches.",
        "",
    ])
    Path(args.output).write_text(text)


def git_head():
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of 1, 2 and 4 processors")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="PROCESSOR_BATCH_SIZE for the processors (default: theirs)")
    parser.add_argument("--drain-timeout", type=float, default=180)
    parser.add_argument("--http-rounds", type=int, default=3)
    parser.add_argument("--http-seconds", type=int, default=6)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--wrk-connections", type=int, default=32)
    parser.add_argument("--output", default=str(REPO / "bench" / "SCALE.md"))
    args = parser.parse_args(argv)
    ensure_wrk()
    started, clock = datetime.now(timezone.utc), time.monotonic()
    machine_rows = machine()
    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    scale = Scale(args, work)
    try:
        log(f"filling a stream with {args.events:,} events")
        scale.fill_template()
        rounds = {count: [] for count in PROCESSORS}
        number = 0
        for round_number in range(args.rounds):
            log(f"round {round_number + 1} of {args.rounds}")
            for count in PROCESSORS:
                rounds[count].append(scale.drain(count, number))
                number += 1
        log("POST /event, file queue against Redis queue")
        http = http_rounds(args, work)
    finally:
        scale.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    by_count = {count: sorted(runs, key=lambda run: run["rate"])[len(runs) // 2]    # the median round
                for count, runs in rounds.items()}
    report(args, machine_rows, by_count, rounds, http, scale.line_bytes, started, time.monotonic() - clock)
    log(f"wrote {args.output}")


if __name__ == "__main__":
    main()
