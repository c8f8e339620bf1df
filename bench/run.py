"""The benchmark suite: every figure of bench/RESULTS.md in one run (the processor's own
figures are bench/processor_bench.py's, in bench/PROCESSOR.md).

    .venv/bin/python bench/run.py            full run, writes bench/RESULTS.md (~6 minutes)
    .venv/bin/python bench/run.py --quick    smoke run, writes bench/out/RESULTS-quick.md (~1.5 minutes)

The machine is small and may be shared, so each figure is a ratio against a
baseline measured in the same run, with load rounds interleaved (baseline,
app, baseline, app, ...) and the median taken. Each load round also records
how much CPU other processes on the machine took meanwhile.
"""
import argparse
import http.client
import io
import math
import os
import platform
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (BENCH, OUT, REPO, BenchError, ForeignCpu, Gunicorn, Wrk, parse_wrk,  # noqa: E402
                           request, start_processor, stop_processor)
from events import encode_event, encode_valid_events, validate_event  # noqa: E402

APP = "ingestion_api:app"
BARE = "bench.bare_app:app"

FULL = dict(sweep_seconds=3, sweep_rounds=2, http_seconds=6, rounds=3, fsync_seconds=5, fsync_rounds=2,
            fresh_seconds=25,
            warm_seconds=1, quiet_budget=45)
QUICK = dict(sweep_seconds=0, sweep_rounds=1, http_seconds=3, rounds=1, fsync_seconds=3, fsync_rounds=1,
             fresh_seconds=6, warm_seconds=1,
             quiet_budget=15)

# (worker class, workers, threads); "--threads 1" keeps sync from turning into gthread
SWEEP = [("sync", 2, 1), ("sync", 4, 1), ("gthread", 2, 8), ("gthread", 2, 16),
         ("gthread", 3, 8), ("gthread", 4, 4), ("gthread", 4, 8)]

QUIET_CORES = 0.3       # other processes' CPU under which a load round may start


def log(message):
    print(message, flush=True)


def median(values):
    return statistics.median(values) if values else float("nan")


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def check_load(name, result):
    if result["non2xx"] or result["socket_errors"]:
        raise BenchError(f"{name}: {result['non2xx']} non-2xx responses and "
                         f"{result['socket_errors']} socket errors under load; see bench/out/")


class Run:
    """Settings, temp directories and everything measured so far."""

    def __init__(self, settings, wrk, keep):
        self.s = settings
        self.wrk = wrk
        self.keep = keep
        self.base = Path(tempfile.mkdtemp(prefix="analytics-bench-"))
        self.results = {}
        self.worker_peaks = []      # (test, pid, MB) for every API worker under load
        self.waited = 0.0           # seconds spent waiting for other processes to calm down

    def data_dir(self, name):
        path = self.base / name
        path.mkdir()
        return path

    def quiet(self):
        """Wait, within the run's budget, until other processes leave the CPU alone.

        Another job on a shared machine skews one round more than the other;
        the budget keeps the whole run bounded in time all the same.
        """
        while self.waited < self.s["quiet_budget"]:
            meter = ForeignCpu()
            time.sleep(0.5)
            if meter.cores() < QUIET_CORES:
                return
            self.waited += 0.5

    def load(self, server, script, seconds, path="/event"):
        self.quiet()
        result = self.wrk.run(server.url + path, script, seconds, server.pids())
        check_load(server.name, result)
        return result

    def warm(self, *servers, script="post_event.lua", path="/event"):
        for server in servers:
            self.wrk.run(server.url + path, script, self.s["warm_seconds"])

    def keep_worker_peaks(self, test, server):
        for pid, peak in server.read_worker_peaks().items():
            self.worker_peaks.append((test, pid, peak))

    def cleanup(self):
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)


# -- 0. the gunicorn settings, by measurement ---------------------------------

def measure_sweep(run):
    """Every candidate up at once, load rounds in a shuffled order, so noise falls on all alike."""
    servers, labels = {}, {}
    for worker_class, workers, threads in SWEEP:
        label = f"{worker_class} -w {workers}" + (f" --threads {threads}" if threads > 1 else "")
        args = ["-k", worker_class, "-w", str(workers), "--threads", str(threads)]
        for kind, app in (("app", APP), ("bare", BARE)):
            name = f"sweep-{kind}-{worker_class}-{workers}-{threads}"
            servers[name] = Gunicorn(name, app, run.data_dir(name), args)
            labels[name] = (label, kind)
    results = {name: [] for name in servers}
    try:
        for server in servers.values():
            server.start()
        run.warm(*servers.values())
        for number in range(run.s["sweep_rounds"]):
            order = list(servers)
            random.Random(number).shuffle(order)
            for name in order:
                results[name].append(run.load(servers[name], "post_event.lua", run.s["sweep_seconds"]))
    finally:
        for server in servers.values():
            server.stop()
    rows = {}
    for name, rounds in results.items():
        label, kind = labels[name]
        rows.setdefault(label, {"label": label})[kind] = rounds
    for row in rows.values():
        log(f"  {row['label']:26} app {median_of(row['app'], 'rps'):6.0f}/s "
            f"({median_of(row['app'], 'cpu_per_request_us'):4.0f} us CPU)  "
            f"bare {median_of(row['bare'], 'rps'):6.0f}/s "
            f"({median_of(row['bare'], 'cpu_per_request_us'):4.0f} us CPU)  "
            f"other CPU {max_foreign(row):.2f}")
    run.results["sweep"] = list(rows.values())


def median_of(results, key):
    return median([result[key] for result in results])


def paired_ratio(measured, baseline, key="rps"):
    """The median over rounds of measured/baseline, each pair run back to back."""
    return median([m[key] / b[key] for m, b in zip(measured, baseline)])


def max_foreign(results):
    return max(result["foreign_cpu"] for rounds in results.values() if isinstance(rounds, list)
               for result in rounds)


def idle_estimate(results):
    """Requests/s an otherwise idle machine would give: its cores over CPU per request."""
    return (os.cpu_count() or 1) * 1e6 / median_of(results, "cpu_per_request_us")


# -- 1 and 2. POST /event and POST /events against the bare app ----------------

def measure_http(run):
    """Both servers run the settings of gunicorn.conf.py; load alternates between them."""
    app = Gunicorn("app", APP, run.data_dir("http-app"))
    bare = Gunicorn("bare", BARE, run.data_dir("http-bare"))
    with app, bare:
        run.warm(app, bare)
        run.results["event"] = alternate(run, {"bare": bare, "app": app}, "post_event.lua", "/event",
                                         run.s["http_seconds"], run.s["rounds"])
        report_pair("POST /event", run.results["event"])
        run.warm(app, bare, script="post_events.lua", path="/events")
        run.results["events"] = alternate(run, {"bare": bare, "app": app}, "post_events.lua", "/events",
                                          run.s["http_seconds"], run.s["rounds"])
        report_pair("POST /events x100", run.results["events"], per_request=100)
        run.warm(app, script="post_plausible.lua", path="/api/event")
        run.results["api_event"] = alternate_loads(
            run, {"event": (app, "post_event.lua", "/event"),
                  "api_event": (app, "post_plausible.lua", "/api/event")},
            run.s["http_seconds"], run.s["rounds"])
        report_ratio("POST /api/event vs POST /event", run.results["api_event"], "api_event", "event")
        run.keep_worker_peaks("POST /event and /events", app)
        run.results["workers"] = len(app.workers())
        queued = queue_size(app)
    sent = sum(r["requests"] for r in run.results["event"]["app"]) \
        + 100 * sum(r["requests"] for r in run.results["events"]["app"])
    run.results["http_queued"] = (queued, sent)


def alternate(run, servers, script, path, seconds, rounds):
    """Rounds of one load run per server, the order flipped every round."""
    return alternate_loads(run, {name: (server, script, path) for name, server in servers.items()},
                           seconds, rounds)


def alternate_loads(run, loads, seconds, rounds):
    """Rounds of each load (name: (server, script, path)), the order flipped every round."""
    results = {name: [] for name in loads}
    names = list(loads)
    for number in range(rounds):
        for name in (names if number % 2 == 0 else names[::-1]):
            server, script, path = loads[name]
            results[name].append(run.load(server, script, seconds, path))
    return results


def report_ratio(title, results, measured, baseline):
    for number, (m, b) in enumerate(zip(results[measured], results[baseline]), 1):
        log(f"  {title} round {number}: {m['rps']:7.0f}/s against {b['rps']:7.0f}/s  "
            f"ratio {m['rps'] / b['rps']:.2f}  other CPU {max(m['foreign_cpu'], b['foreign_cpu']):.2f}")


# -- metrics and rate limiting ------------------------------------------------

def measure_operations(run):
    """POST /event with metrics and the rate limit on (a limit never reached) against both off."""
    servers = {"on": Gunicorn("operations-on", APP, run.data_dir("operations-on"),
                              env={"METRICS": "on"}),
               "off": Gunicorn("operations-off", APP, run.data_dir("operations-off"),
                               env={"METRICS": "off", "RATE_LIMIT": "off"})}
    with servers["on"], servers["off"]:
        run.warm(*servers.values())
        run.results["operations"] = alternate(run, servers, "post_event.lua", "/event",
                                              run.s["http_seconds"], run.s["rounds"])
        status, body = request(servers["on"].port, "GET", "/metrics")
        if status != 200 or b"analytics_events_accepted_total" not in body:
            raise BenchError("GET /metrics of the server with metrics on did not count the load")
    report_ratio("metrics and rate limit on vs off", run.results["operations"], "on", "off")


def report_pair(title, results, per_request=1):
    for number, (b, a) in enumerate(zip(results["bare"], results["app"]), 1):
        log(f"  {title} round {number}: app {a['rps'] * per_request:9.0f}/s  "
            f"bare {b['rps'] * per_request:9.0f}/s  ratio {a['rps'] / b['rps']:.2f}  "
            f"other CPU {max(a['foreign_cpu'], b['foreign_cpu']):.2f}")


def queue_size(server):
    status, body = request(server.port, "GET", "/health")
    return orjson.loads(body).get("queue_size")


# -- 4. fsync policies --------------------------------------------------------

def measure_fsync(run):
    servers = {policy: Gunicorn(f"fsync-{policy}", APP, run.data_dir(f"fsync-{policy}"),
                                env={"FSYNC": policy})
               for policy in ("never", "batch", "always")}
    for server in servers.values():
        server.start()
    try:
        run.warm(*servers.values())
        results = alternate(run, servers, "post_event.lua", "/event",
                            run.s["fsync_seconds"], run.s["fsync_rounds"])
        for policy, server in servers.items():
            run.keep_worker_peaks(f"FSYNC={policy}", server)
    finally:
        for server in servers.values():
            server.stop()
    run.results["fsync"] = results
    for policy, rounds in results.items():
        log(f"  FSYNC={policy:6} " + "  ".join(f"{r['rps']:7.0f}/s p99 {r['p99']:.1f} ms" for r in rounds))


# -- 5. freshness under load -------------------------------------------------

class Probe:
    """One kept-alive client: post an event of a new site, poll /stats until it counts."""

    def __init__(self, port):
        self.port = port
        self.connection = None

    def call(self, method, path, body=None):
        for attempt in (1, 2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self.connection.request(method, path, body=body,
                                        headers={"Content-Type": "application/json"})
                response = self.connection.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException):
                self.connection.close()
                self.connection = None
                if attempt == 2:
                    raise

    def freshness(self, site_id, deadline_seconds=10.0):
        body = orjson.dumps({"site_id": site_id, "event_type": "page_view", "path": "/probe"})
        status, answer = self.call("POST", "/event", body)
        if status != 200:
            raise BenchError(f"probe POST /event answered {status}: {answer[:200]!r}")
        acknowledged = time.perf_counter()
        while time.perf_counter() - acknowledged < deadline_seconds:
            status, answer = self.call("GET", f"/stats?site_id={site_id}")
            if status == 200 and orjson.loads(answer)["total_views"] >= 1:
                return time.perf_counter() - acknowledged
            time.sleep(0.002)
        return math.inf


def measure_freshness(run):
    data = run.data_dir("freshness")
    seconds = run.s["fresh_seconds"]
    with Gunicorn("freshness", APP, data) as server:
        processor = start_processor(data, "freshness")
        try:
            probe = Probe(server.port)
            probe.freshness(f"warmup-{os.getpid()}", deadline_seconds=30)
            load = run.wrk.start(server.url + "/event", "post_event.lua", seconds + 3)
            time.sleep(1)
            samples, started = [], time.perf_counter()
            while time.perf_counter() - started < seconds:
                samples.append(probe.freshness(f"fresh-{os.getpid()}-{len(samples)}"))
            backlog = queue_size(server)
            output, _ = load.communicate(timeout=seconds + 30)
        finally:
            code, processor_peak = stop_processor(processor)
        run.keep_worker_peaks("freshness (API + processor + wrk)", server)
    background = parse_wrk(output)
    check_load("freshness background load", background)
    run.results["freshness"] = dict(samples=samples, backlog=backlog, background=background,
                                    processor_peak=processor_peak, processor_exit=code)
    finite = [s for s in samples if s != math.inf]
    log(f"  {len(samples)} probes under {background['rps']:.0f} requests/s: "
        f"p50 {median(finite) * 1000:.0f} ms, p99 {percentile(samples, 0.99) * 1000:.0f} ms, "
        f"max {max(samples) * 1000:.0f} ms; backlog at the end {backlog}")


# -- where POST /event spends its time, in-process ----------------------------

def lua_body(script):
    """The request body a wrk script sends: its `wrk.body = '...' .. '...'` literal."""
    literal = (BENCH / script).read_text().split("wrk.body = ", 1)[1]
    body = "".join(re.findall(r"'([^']*)'", literal)).encode()
    orjson.loads(body)
    return body


def measure_hot_path(run):
    """Microseconds per call of each part of POST /event, without HTTP or gunicorn."""
    from flask import Flask, Response

    from bench.bare_app import BODY as EVENT_RECEIVED
    from bench.bare_app import app as bare_app
    from config import load_config
    from events import parse_json
    from ingestion_api import create_app
    from shared_queue import open_queue

    body = lua_body("post_event.lua")
    config = load_config(environ={}, data_dir=str(run.data_dir("hot-path")))
    app = create_app(config)
    constant = Flask("constant")
    constant.post("/event")(lambda: Response(EVENT_RECEIVED, mimetype="application/json"))

    def wsgi(application):
        def call():
            environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/event", "SCRIPT_NAME": "",
                       "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80",
                       "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "127.0.0.1",
                       "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)),
                       "wsgi.input": io.BytesIO(body), "wsgi.url_scheme": "http",
                       "wsgi.errors": sys.stderr, "wsgi.multithread": True,
                       "wsgi.multiprocess": True, "wsgi.run_once": False}
            answer = application(environ, lambda status, headers, exc_info=None: None)
            b"".join(answer)
            getattr(answer, "close", lambda: None)()
        return call

    event = validate_event(parse_json(body))
    line = encode_event(event)
    queue = open_queue(config)
    batch = [{"site_id": "bench-load", "event_type": "page_view", "path": f"/docs/page-{i:03d}",
              "user_id": f"u-{i * 7919:08d}", "timestamp": f"2025-01-31T12:{i % 60:02d}:{i * 13 % 60:02d}.{i:03d}Z"}
             for i in range(1, 101)]       # what post_events.lua sends
    now = datetime.now(timezone.utc)
    parts = [("bare WSGI callable (baseline)", wsgi(bare_app)),
             ("Flask route returning a constant", wsgi(constant)),
             ("the app's POST /event, whole", wsgi(app)),
             ("  parse_json", lambda: parse_json(body)),
             ("  validate_event", lambda: validate_event(parse_json(body))),
             ("  encode_event", lambda: encode_event(event)),
             ("  FileQueue.append, one line", lambda: queue.append([line])),
             ("POST /events: encode_valid_events, 100 events", lambda: encode_valid_events(batch, now)),
             ("POST /events: validate_event + encode_event x 100",
              lambda: [encode_event(validate_event(item, now)) for item in batch])]
    timings = []
    for name, call in parts:
        for _ in range(500):
            call()
        best = math.inf
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(2000):
                call()
            best = min(best, (time.perf_counter() - started) / 2000)
        timings.append((name, best * 1e6))
        log(f"  {name:36} {best * 1e6:6.1f} us")
    queue.close()
    run.results["hot_path"] = timings


# -- the report ---------------------------------------------------------------

def machine_facts():
    def command(*args):
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout
        except OSError:
            return ""
    model = next((line.split(":", 1)[1].strip() for line in command("lscpu").splitlines()
                  if line.startswith("Model name")), platform.processor() or "unknown")
    return {"cores (nproc)": command("nproc").strip(), "CPU model (lscpu)": model,
            "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
            "Python": platform.python_version(), "SQLite": sqlite3.sqlite_version,
            "gunicorn": version("gunicorn"), "Flask": version("flask"),
            "wrk": command("wrk", "-v").split("[")[0].replace("wrk", "").strip() or "?"}


def gunicorn_defaults():
    """The settings gunicorn.conf.py gives (what the unflagged servers ran with)."""
    namespace = {}
    exec((REPO / "gunicorn.conf.py").read_text(), namespace)
    return f"{namespace.get('worker_class', 'sync')} -w {namespace.get('workers', 1)} " \
           f"--threads {namespace.get('threads', 1)}"


def code_version():
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def load_rounds(run):
    r = run.results
    groups = [r.get(name, {}) for name in ("event", "events", "api_event", "operations", "fsync")]
    groups += [{k: v for k, v in row.items() if k != "label"} for row in r.get("sweep", [])]
    return [x for group in groups for rounds in group.values() for x in rounds]


def verdict(ok):
    return "met" if ok else "**missed**"


def summary_rows(run):
    r = run.results
    rows = []
    if "event" in r:
        app, bare = r["event"]["app"], r["event"]["bare"]
        ratio = paired_ratio(app, bare)
        rows.append(("POST /event requests/s", f"{median_of(app, 'rps'):,.0f}",
                     f"bare WSGI app {median_of(bare, 'rps'):,.0f}", f"{ratio:.2f}", ">= 0.75",
                     verdict(ratio >= 0.75)))
        cpu_app, cpu_bare = median_of(app, "cpu_per_request_us"), median_of(bare, "cpu_per_request_us")
        rows.append(("POST /event CPU per request (gunicorn + wrk); ratio = bare/app",
                     f"{cpu_app:.0f} us", f"bare WSGI app {cpu_bare:.0f} us",
                     f"{cpu_bare / cpu_app:.2f}", ">= 0.75", verdict(cpu_bare / cpu_app >= 0.75)))
        for p in ("p50", "p99"):
            rows.append((f"POST /event {p} latency", f"{median_of(app, p):.1f} ms",
                         f"bare WSGI app {median_of(bare, p):.1f} ms",
                         f"{paired_ratio(app, bare, p):.2f}", "", ""))
    if "events" in r:
        app, bare = r["events"]["app"], r["events"]["bare"]
        rate = 100 * median_of(app, "rps")
        rows.append(("POST /events, 100-event batches: events/s", f"{rate:,.0f}",
                     f"bare WSGI app, same body {100 * median_of(bare, 'rps'):,.0f}",
                     f"{paired_ratio(app, bare):.2f}", ">= 300,000 events/s", verdict(rate >= 300_000)))
        idle = 100 * idle_estimate(app)
        rows.append(("POST /events events/s, idle-machine estimate (cores / CPU per request)",
                     f"{idle:,.0f}", f"{median_of(app, 'cpu_per_request_us') / 100:.1f} us CPU per event",
                     "", ">= 300,000 events/s", verdict(idle >= 300_000)))
    ratios_to_0_9 = (("api_event", "api_event", "event", "POST /api/event requests/s (same server)",
                      "POST /event"),
                     ("operations", "on", "off", "POST /event requests/s, metrics and rate limit on",
                      "both off"))
    for test, measured, baseline, title, baseline_title in ratios_to_0_9:
        if test in r:
            m, b = r[test][measured], r[test][baseline]
            ratio = paired_ratio(m, b)
            rows.append((title, f"{median_of(m, 'rps'):,.0f}", f"{baseline_title} {median_of(b, 'rps'):,.0f}",
                         f"{ratio:.2f}", ">= 0.9", verdict(ratio >= 0.9)))
    if "fsync" in r:
        never = r["fsync"]["never"]
        for policy in ("batch", "always"):
            rounds = r["fsync"][policy]
            rows.append((f"POST /event requests/s, FSYNC={policy}", f"{median_of(rounds, 'rps'):,.0f}",
                         f"FSYNC=never {median_of(never, 'rps'):,.0f}",
                         f"{paired_ratio(rounds, never):.2f}", "(reported)", ""))
    if "freshness" in r:
        samples = r["freshness"]["samples"]
        p99 = percentile(samples, 0.99)
        rows.append((f"freshness p99, 200 to counted by /stats ({len(samples)} probes)",
                     f"{p99 * 1000:,.0f} ms", f"p50 {median(samples) * 1000:,.0f} ms", "",
                     "< 1 s", verdict(p99 < 1.0)))
    if run.worker_peaks:
        peak = max(mb for _, _, mb in run.worker_peaks)
        rows.append(("peak RSS per API worker under load", f"{peak:.0f} MB",
                     f"{len(run.worker_peaks)} workers", "", "< 80 MB", verdict(peak < 80)))
    return rows


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def rounds_table(run):
    rows = []
    tests = (("event", "POST /event", 1), ("events", "POST /events", 100),
             ("api_event", "POST /event and /api/event", 1), ("operations", "POST /event, metrics+limit", 1))
    for test, title, per_request in tests:
        for name, results in run.results.get(test, {}).items():
            for number, x in enumerate(results, 1):
                rows.append((title, name, number, f"{x['rps'] * per_request:,.0f}",
                             f"{x['p50']:.1f}", f"{x['p99']:.1f}", f"{x['cpu_per_request_us']:.0f}",
                             f"{x['foreign_cpu']:.2f}"))
    for policy, results in run.results.get("fsync", {}).items():
        for number, x in enumerate(results, 1):
            rows.append(("POST /event", f"FSYNC={policy}", number, f"{x['rps']:,.0f}",
                         f"{x['p50']:.1f}", f"{x['p99']:.1f}", f"{x['cpu_per_request_us']:.0f}",
                         f"{x['foreign_cpu']:.2f}"))
    return table(("test", "server", "round", "per second", "p50 ms", "p99 ms",
                  "CPU us per request", "other processes' CPU (cores)"), rows)


LIMITS = """\
- **POST /event vs the bare app.** Both run under the same gunicorn workers, so the ratio is the
  share of each request's CPU that is not the app. The bare app costs ~{bare_us:.0f} us in-process;
  the app's POST /event costs ~{app_us:.0f} us. It is answered by a plain WSGI fast path in front of
  Flask (a Flask route that only returns a constant would take ~{flask_us:.0f} us by itself); what
  remains is the project's own work (parse {parse_us:.1f} us, validate {validate_us:.1f} us, encode
  {encode_us:.1f} us, locked append {append_us:.1f} us) plus the rate-limit count and the metrics.
  Under gunicorn the app adds more CPU per request than it costs in-process (compare the CPU per
  request rows): the writers' flocks on the queue and on the rate-limit counters are contended
  across processes, and in threaded workers a thread holding one waits for the GIL (the sweep
  shows what that costs, and why gunicorn.conf.py runs sync workers). On 2 cores, which wrk
  shares, gunicorn's own Python HTTP handling and that contention bound the figure.
- **POST /events.** 100 events per request spread the per-request cost, so the limit becomes
  per-event work. A batch is parsed by orjson, its types and lengths are checked in one
  `msgspec.convert` call and its lines written by one `encode_lines` call; what is left in Python
  is the timestamp check and the id, about {batch_us:.1f} us per event in-process where checking
  event by event with `validate_event` and `encode_event` costs {one_by_one_us:.1f} us (that path
  runs only to name the first bad event of a batch that has one). One locked append per batch.
- **Processor.** Measured by `bench/processor_bench.py`; see `bench/PROCESSOR.md`.
- **FSYNC.** `always` makes every request wait for an fdatasync under the writers' lock, so
  requests are serialised on the disk's flush latency; `batch` syncs at most every 0.2 s per worker.
- **Freshness.** An acknowledged event waits for the processor's next poll (0.05 s when idle) or for
  the batch in progress, then for its commit; under full load the processor shares 2 cores with
  gunicorn and wrk, and the probe's /stats requests queue behind wrk's connections. The probe polls
  every 2 ms plus one request's latency, so the figure is an upper bound.
- **Memory.** An API worker holds Flask, orjson and the queue writer (a few MB of its own above the
  interpreter); the processor holds one batch of lines and rows (10,000 by default) at a time, not the
  queue.
"""


def noise_note(run):
    rounds = load_rounds(run)
    if not rounds:
        return ""
    foreign = [x["foreign_cpu"] for x in rounds]
    return (f"Other processes on the machine took a median of {median(foreign):.2f} cores (max "
            f"{max(foreign):.2f}) of the {os.cpu_count()} during the load rounds; the run waited "
            f"{run.waited:.0f} s for quieter moments (budget {run.s['quiet_budget']} s). Requests/s "
            f"shrink with that load; the ratios, taken round by round, and the CPU per request much "
            f"less so.\n")


def render(run, command, started, elapsed):
    r = run.results
    out = [f"# Benchmark results\n",
           f"Run on {started:%Y-%m-%d %H:%M} UTC with `{command}` ({elapsed / 60:.1f} minutes), "
           f"code at `{code_version()}`.\n",
           table(("machine", ""), machine_facts().items()), "",
           f"gunicorn settings from gunicorn.conf.py: `{gunicorn_defaults()}`; "
           f"wrk `-t{run.wrk.threads} -c{run.wrk.connections}` on the same machine, "
           f"a {run.s['http_seconds']} s run per round, median of {run.s['rounds']} interleaved "
           f"rounds. Each server has a fresh DATA_DIR.\n",
           noise_note(run),
           "## Figures against their baselines\n",
           table(("figure", "measured", "baseline (same run)", "ratio", "target", "verdict"),
                 summary_rows(run)), ""]
    if "sweep" in r:
        out += [f"## gunicorn settings sweep (POST /event, {run.s['sweep_rounds']} shuffled rounds "
                f"of {run.s['sweep_seconds']} s each, medians)\n",
                "CPU per request is the CPU of gunicorn's processes and wrk per answered request; "
                "the idle-machine estimate is cores / CPU per request, which other jobs on the "
                "machine hardly move.\n",
                table(("settings", "app requests/s", "app p99 ms", "app CPU per request",
                       "app, idle-machine estimate", "bare requests/s", "bare CPU per request",
                       "ratio (requests/s)", "ratio (CPU)", "other CPU (cores, max)"),
                      [(x["label"], f"{median_of(x['app'], 'rps'):,.0f}",
                        f"{median_of(x['app'], 'p99'):.1f}",
                        f"{median_of(x['app'], 'cpu_per_request_us'):.0f} us",
                        f"{idle_estimate(x['app']):,.0f}/s",
                        f"{median_of(x['bare'], 'rps'):,.0f}",
                        f"{median_of(x['bare'], 'cpu_per_request_us'):.0f} us",
                        f"{paired_ratio(x['app'], x['bare']):.2f}",
                        f"{median_of(x['bare'], 'cpu_per_request_us') / median_of(x['app'], 'cpu_per_request_us'):.2f}",
                        f"{max_foreign(x):.2f}")
                       for x in r["sweep"]]), ""]
    if "hot_path" in r:
        out += ["## Where POST /event and /events spend their time (in-process, best of 5 x 2,000 calls)\n",
                table(("part", "us per call"), [(name.replace("  ", "- "), f"{us:.1f}")
                                                 for name, us in r["hot_path"]]), ""]
    out += ["## Every load round\n", rounds_table(run), ""]
    if "freshness" in r:
        f = r["freshness"]
        out += [f"Freshness: {len(f['samples'])} probes while wrk sent "
                f"{f['background']['rps']:,.0f} POST /event per second; the queue backlog at the end "
                f"was {f['backlog']} events; the running processor peaked at "
                f"{f['processor_peak']:.0f} MB.\n"]
    if run.worker_peaks:
        tests = {}
        for test, _, mb in run.worker_peaks:
            tests.setdefault(test, []).append(mb)
        out += ["Peak RSS (VmHWM) of the API workers: " + "; ".join(
            f"{test}: {len(peaks)} workers, {min(peaks):.0f}-{max(peaks):.0f} MB"
            for test, peaks in tests.items()) + ".\n"]
    if "hot_path" in r:
        us = dict(r["hot_path"])
        out += ["## What limits each figure\n", LIMITS.format(
            bare_us=us["bare WSGI callable (baseline)"], app_us=us["the app's POST /event, whole"],
            flask_us=us["Flask route returning a constant"], parse_us=us["  parse_json"],
            validate_us=us["  validate_event"], encode_us=us["  encode_event"],
            append_us=us["  FileQueue.append, one line"],
            batch_us=us["POST /events: encode_valid_events, 100 events"] / 100,
            one_by_one_us=us["POST /events: validate_event + encode_event x 100"] / 100)]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller smoke run (< 2 minutes)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these parts")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--output", help="where to write the report (default bench/RESULTS.md, "
                                         "or bench/out/RESULTS-quick.md with --quick)")
    parser.add_argument("--keep", action="store_true", help="keep the temp data directories")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    output = Path(args.output) if args.output else (
        OUT / "RESULTS-quick.md" if args.quick else BENCH / "RESULTS.md")
    command = " ".join([".venv/bin/python bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    sections = args.only or [name for name in SECTIONS if name != "sweep" or settings["sweep_seconds"]]

    run = Run(settings, Wrk(args.threads, args.connections), args.keep)
    started, clock = datetime.now(timezone.utc), time.monotonic()
    try:
        for name in sections:
            log(f"== {name}")
            SECTIONS[name](run)
    except BenchError as error:
        log(f"benchmark failed: {error}")
        return 1
    finally:
        run.cleanup()
    elapsed = time.monotonic() - clock
    report = render(run, command, started, elapsed)
    OUT.mkdir(exist_ok=True)
    output.write_text(report)
    log("\n" + table(("figure", "measured", "baseline (same run)", "ratio", "target", "verdict"),
                     summary_rows(run)))
    log(f"\n{elapsed / 60:.1f} minutes; written to {output}")
    queued = run.results.get("http_queued")
    if queued and queued[0] is not None and queued[0] < queued[1]:
        log(f"warning: the queue holds {queued[0]} events but wrk counted {queued[1]} answered")
    return 0


SECTIONS = {"sweep": measure_sweep, "http": measure_http, "operations": measure_operations,
            "fsync": measure_fsync,
            "freshness": measure_freshness,
            "hot_path": measure_hot_path}

if __name__ == "__main__":
    sys.exit(main())
