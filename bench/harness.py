"""Processes the benchmark drives: gunicorn servers, the processor, wrk.

Everything listens on 127.0.0.1 only, every load is bounded in time, and
every process started here is stopped here (its own process group).
"""
import http.client
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
OUT = BENCH / "out"
PYTHON = sys.executable
# wrk sends from one address: the rate limiter counts every request, as in
# production, with a limit the load never reaches.
NEVER_REACHED = "1000000000/second"


class BenchError(Exception):
    """The benchmark could not measure what it meant to (not a slow result)."""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_wrk():
    """wrk from the distribution's packages, installed on first use."""
    if shutil.which("wrk"):
        return shutil.which("wrk")
    print("wrk is missing: apt-get install -y wrk", flush=True)
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(install, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL, check=False)
        subprocess.run(install, stdout=subprocess.DEVNULL, check=False)
    if not shutil.which("wrk"):
        raise BenchError("wrk is not installed and `apt-get install -y wrk` failed")
    return shutil.which("wrk")


def peak_rss_mb(pid):
    """The kernel's high-water mark of a live process's resident set (VmHWM)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return None


class Gunicorn:
    """gunicorn serving `app` from the repository root, so gunicorn.conf.py applies.

    `args` are extra command-line flags (they override the config file).
    """

    def __init__(self, name, app, data_dir, args=(), env=None):
        self.name = name
        self.app = app
        self.data_dir = data_dir
        self.args = list(args)
        self.env = dict(env or {})
        self.port = None
        self.process = None
        self.worker_peaks = {}     # pid -> peak RSS in MB, read just before stopping

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=30):
        self.port = free_port()
        env = {**os.environ, "DATA_DIR": str(self.data_dir), "HOST": "127.0.0.1",
               "PORT": str(self.port), "RATE_LIMIT": NEVER_REACHED, **self.env}
        for name in ("API_KEYS", "API_KEYS_FILE"):     # the freshness probe reads /stats
            env.pop(name, None)
        OUT.mkdir(exist_ok=True)
        self.log_path = OUT / f"gunicorn-{self.name}.log"
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [PYTHON, "-m", "gunicorn", *self.args, self.app],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"gunicorn {self.name} exited at start; see {self.log_path}")
            try:
                status, _ = request(self.port, "GET", "/health", timeout=1)
                if status and self._all_workers_up():
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise BenchError(f"gunicorn {self.name} did not answer within {timeout}s")

    def _all_workers_up(self):
        """A worker that fails to boot makes gunicorn stop: give that a moment to show."""
        time.sleep(0.5)
        if self.process.poll() is not None:
            raise BenchError(f"gunicorn {self.name} stopped after its first answer; see {self.log_path}")
        return True

    def pids(self):
        return [self.process.pid] + [worker.pid for worker in self.workers()]

    def workers(self):
        try:
            return psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return []

    def read_worker_peaks(self):
        for worker in self.workers():
            peak = peak_rss_mb(worker.pid)
            if peak is not None:
                self.worker_peaks[worker.pid] = max(peak, self.worker_peaks.get(worker.pid, 0))
        return self.worker_peaks

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        self.read_worker_peaks()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def request(port, method, path, body=None, headers=None, timeout=5):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def start_processor(data_dir, name, once=False, env=None):
    """processor.py as a child process (its peak RSS comes back from wait4)."""
    OUT.mkdir(exist_ok=True)
    log_path = OUT / f"processor-{name}.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [PYTHON, "processor.py", *(["--once"] if once else [])],
        cwd=REPO, env=dict(os.environ, DATA_DIR=str(data_dir), **(env or {})),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    process.log_path = log_path
    return process


def wait_with_peak_rss(process, timeout):
    """Wait for a child; return (exit code, its peak RSS in MB).

    The peak is the kernel's VmHWM, read every few milliseconds while the child
    lives (a high-water mark, so a late read loses nothing before it). Not
    wait4's ru_maxrss: that also counts this process's memory at the fork.
    """
    deadline = time.monotonic() + timeout
    peak = 0.0
    while time.monotonic() < deadline:
        peak = max(peak, peak_rss_mb(process.pid) or 0.0)
        if process.poll() is not None:
            return process.returncode, peak
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    raise BenchError(f"{process.args} did not finish within {timeout}s")


def stop_processor(process, timeout=30):
    """SIGTERM (finish the batch, exit 0); returns (exit code, peak RSS in MB)."""
    process.send_signal(signal.SIGTERM)
    return wait_with_peak_rss(process, timeout)


# -- wrk ------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _millis(text):
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS[unit]


def parse_wrk(output):
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
              "requests": int(re.search(r"(\d+) requests in", output).group(1))}
    for percent in ("50", "90", "99"):
        match = re.search(rf"^\s+{percent}%\s+(\S+)", output, re.M)
        result[f"p{percent}"] = _millis(match.group(1)) if match else None
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result["non2xx"] = int(match.group(1)) if match else 0
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    result["socket_errors"] = sum(map(int, match.groups())) if match else 0
    return result


class Wrk:
    def __init__(self, threads, connections):
        self.binary = ensure_wrk()
        self.threads = threads
        self.connections = connections

    def command(self, url, script, seconds):
        return [self.binary, f"-t{self.threads}", f"-c{self.connections}", f"-d{seconds}s",
                "--timeout", "5s", "--latency", "-s", str(BENCH / script), url]

    def run(self, url, script, seconds, server_pids=()):
        """One bounded load run: wrk's figures, plus where the CPU went meanwhile.

        cpu_per_request is the CPU (user + system) of the server's processes and
        of wrk per answered request: unlike requests/s it hardly moves when
        other jobs share the machine, so 2 cores / cpu_per_request estimates
        the requests/s of an otherwise idle machine.
        """
        meter = ForeignCpu()
        servers = [psutil.Process(pid) for pid in server_pids]
        server_before = sum(_cpu_seconds(process) for process in servers)
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(self.command(url, script, seconds), capture_output=True, text=True,
                              timeout=seconds + 30)
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_cpu = sum(_cpu_seconds(process) for process in servers) - server_before
        if done.returncode != 0 or "Requests/sec" not in done.stdout:
            raise BenchError(f"wrk failed: {done.stderr or done.stdout}")
        result = parse_wrk(done.stdout)
        result["foreign_cpu"] = meter.cores()
        wrk_cpu = (children_after.ru_utime + children_after.ru_stime
                   - children_before.ru_utime - children_before.ru_stime)
        result["server_cpu_us"] = server_cpu / max(result["requests"], 1) * 1e6
        result["cpu_per_request_us"] = (server_cpu + wrk_cpu) / max(result["requests"], 1) * 1e6
        return result

    def start(self, url, script, seconds):
        """A background load, bounded by its own duration."""
        return subprocess.Popen(self.command(url, script, seconds), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _cpu_seconds(process):
    try:
        times = process.cpu_times()
        return times.user + times.system
    except psutil.NoSuchProcess:
        return 0.0


class ForeignCpu:
    """CPU used by processes outside this benchmark while it measures, in cores.

    The machine may be shared; this says how much of it something else took.
    Kernel threads are left out (loopback traffic is partly accounted there).
    Processes that start and end inside the window are missed, so it is a floor.
    """

    def __init__(self):
        self.start_time = time.monotonic()
        self.start = self._snapshot()

    @staticmethod
    def _ours():
        me = psutil.Process()
        return {me.pid} | {child.pid for child in me.children(recursive=True)}

    @staticmethod
    def _snapshot():
        times = {}
        for process in psutil.process_iter(["pid", "ppid", "cpu_times", "create_time"]):
            info = process.info
            if info["cpu_times"] is None or info["pid"] == 2 or info["ppid"] == 2:
                continue
            times[(info["pid"], info["create_time"])] = info["cpu_times"].user + info["cpu_times"].system
        return times

    def cores(self):
        elapsed = time.monotonic() - self.start_time
        ours = self._ours()
        used = 0.0
        for (pid, created), seconds in self._snapshot().items():
            if pid not in ours:
                used += seconds - self.start.get((pid, created), 0.0)
        return used / elapsed if elapsed > 0 else 0.0
