"""LOG_FORMAT=json: one JSON object per line, carrying the fields each line was logged with."""
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import orjson
import pytest
import requests

from config import load_config
from events import encode_event, validate_event
from logs import AccessJsonFormatter, JsonFormatter, formatter, scrub
from processes import (REPO, Api, environment, free_port, is_healthy, run_processor_once, start_processor,
                       stop, wait_for)
from retention import utc_today
from processor import log_file_handler
from shared_queue import open_queue
from test_queue import in_a_child_that_may_not_write_past

BASIC_FIELDS = {"time", "level", "logger", "pid", "message"}


def formatted(msg, *args, exc_info=None, formatter=JsonFormatter()):
    record = logging.LogRecord("processor", logging.INFO, __file__, 1, msg, args, exc_info)
    return orjson.loads(formatter.format(record))


def test_key_value_pairs_become_fields_with_the_values_logged():
    line = formatted("progress stored=%d rate=%.0f/s backlog=%d", 1200, 240.5, 7)
    assert line["message"] == "progress stored=1200 rate=240/s backlog=7"
    assert (line["stored"], line["rate"], line["backlog"]) == (1200, 240.5, 7)
    assert set(line) == BASIC_FIELDS | {"stored", "rate", "backlog"}
    assert line["level"] == "INFO" and line["logger"] == "processor"
    assert line["time"].endswith("Z") and len(line["time"]) == len("2025-03-01T10:00:00.123Z")


def test_strings_keep_their_precision_and_literal_pairs_are_fields_too():
    line = formatted("dropped event reason=bot line=%.5r note: %s", "x" * 50, "free text")
    assert line["reason"] == "bot" and line["line"] == "x" * 5
    assert "note" not in line


def test_a_field_never_replaces_the_basic_ones():
    line = formatted("odd message=%s level=%s", "mine", "mine too")
    assert line["message"] == "odd message=mine level=mine too" and line["level"] == "INFO"


def test_an_exception_is_carried_as_its_traceback_on_the_same_line():
    try:
        raise ValueError("boom")
    except ValueError:
        text = JsonFormatter().format(logging.LogRecord(
            "processor", logging.ERROR, __file__, 1, "batch failed; retrying in %.1fs", (0.1,),
            sys.exc_info()))
    assert "\n" not in text
    line = orjson.loads(text)
    assert "ValueError: boom" in line["exception"] and line["level"] == "ERROR"


def test_a_text_line_begins_with_its_time_in_utc_whatever_the_server_s_time_zone(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        record = logging.LogRecord("processor", logging.INFO, __file__, 1, "started", (), None)
        record.created = datetime(2025, 3, 1, 10, 0, 0, 123000, timezone.utc).timestamp()
        line = formatter("text").format(record)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert line == f"2025-03-01T10:00:00.123Z INFO processor [{os.getpid()}] started"


def test_a_text_line_is_one_line_whatever_breaks_its_message_holds_and_a_traceback_follows_it():
    message = ('error connecting: connection to server at "127.0.0.1", port 9 failed: Connection '
               "refused\n\tIs the server running on that host and accepting TCP/IP connections?")
    record = logging.LogRecord("psycopg.pool", logging.WARNING, __file__, 1, message, (), None)
    [line] = formatter("text").format(record).splitlines()
    assert line.endswith("WARNING psycopg.pool [%d] error connecting: connection to server at "
                         '"127.0.0.1", port 9 failed: Connection refused Is the server running on '
                         "that host and accepting TCP/IP connections?" % os.getpid())
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        failed = logging.LogRecord("processor", logging.ERROR, __file__, 1, "batch\nfailed", (),
                                   sys.exc_info())
    first, *traceback = formatter("text").format(failed).splitlines()
    assert first.endswith("batch failed") and traceback[-2:] == ["ValueError: bad", "thing"]


@pytest.mark.timeout(60)     # reading the runs of blanks again from each of their blanks took hours
def test_long_runs_of_blanks_are_kept_and_those_around_a_line_break_become_one_space():
    blanks = " " * 100_000
    message = f"a{blanks}b{blanks}\r\n{blanks}\n\tc \t\nd{blanks}"
    record = logging.LogRecord("processor", logging.WARNING, __file__, 1, message, (), None)
    [line] = formatter("text").format(record).splitlines()
    assert line.endswith(f"WARNING processor [{os.getpid()}] a{blanks}b c d{blanks}")


def test_access_lines_carry_the_request_but_not_the_client_address():
    atoms = {"h": "203.0.113.9", "m": "GET", "U": "/stats", "q": "site_id=a", "s": "200", "B": 76,
             "H": "HTTP/1.1", "f": "-", "a": 'curl \\"7\\"', "D": 2500}
    line = formatted('%(h)s "%(r)s" %(s)s', atoms, formatter=AccessJsonFormatter())
    assert line["message"] == "GET /stats 200"
    assert (line["method"], line["path"], line["query"], line["status"], line["bytes"]) == \
        ("GET", "/stats", "site_id=a", 200, 76)
    assert line["referrer"] is None and line["user_agent"] == 'curl "7"'
    assert line["duration_ms"] == 2.5
    assert "203.0.113.9" not in orjson.dumps(line).decode()


def json_lines(path):
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines, f"{path} is empty"
    parsed = [parsed_or_fail(line, path) for line in lines]
    for line in parsed:
        assert BASIC_FIELDS <= set(line), line
    return parsed


def parsed_or_fail(line, path):
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError as error:
        raise AssertionError(f"not a JSON line in {path.name} ({error}): {line!r}") from None


def first(lines, message_start):
    found = [line for line in lines if line["message"].startswith(message_start)]
    assert found, f"no line starts with {message_start!r}"
    return found[0]


def test_the_processor_writes_json_lines_with_the_fields_of_each_line(data_dir):
    old = (utc_today() - timedelta(days=40)).isoformat()
    queue = open_queue(load_config(environ={}, data_dir=str(data_dir)))
    queue.append([encode_event(validate_event({"site_id": "s", "event_type": "page_view"}))
                  for _ in range(3)]
                 + [b"not json\n", encode_event(validate_event(
                     {"site_id": "s", "event_type": "page_view", "timestamp": f"{old}T10:00:00Z"}))])
    queue.close()
    run_processor_once(data_dir, LOG_FORMAT="json", LOG_LEVEL="DEBUG", RETENTION_DAYS=30,
                       RETENTION_INTERVAL=0.001)
    for lines in (json_lines(data_dir / "processor.log"),
                  json_lines(data_dir.parent / "logs" / "processor.err")):
        assert isinstance(first(lines, "processor started")["backlog"], int)
        batch = first(lines, "batch stored")
        assert (batch["rows"], batch["rejected"]) == (4, 1) and isinstance(batch["seconds"], float)
        dead = first(lines, "dead letter")
        assert (dead["level"], dead["line"]) == ("WARNING", "not json") and dead["reason"]
        deleted = first(lines, "retention deleted")
        assert (deleted["table"], deleted["rows"]) == ("events", 1)
        stopped = first(lines, "processor stopped")
        assert (stopped["stored"], stopped["dead_letters"]) == (4, 1)


@pytest.mark.parametrize("log_format", ["json", "JSON"])      # read in any case, as config.py reads it
def test_gunicorn_and_the_app_write_json_lines_and_an_access_line_per_request(data_dir, log_format):
    api = Api(data_dir, workers=2, LOG_FORMAT=log_format)
    try:
        assert requests.post(api.url + "/event", json={"site_id": "s", "event_type": "page_view"},
                             timeout=10).status_code == 200
        assert requests.post(api.url + "/event", data=b"{", timeout=10).status_code == 400
        assert requests.get(api.url + "/stats", params={"site_id": "s"}, timeout=10).status_code == 200
    finally:
        assert stop(api.process, signal.SIGTERM) == 0
    logs = data_dir.parent / "logs"
    access = json_lines(logs / "gunicorn.out")
    assert {line["logger"] for line in access} == {"gunicorn.access"}
    requests_seen = [(line["method"], line["path"], line["status"]) for line in access]
    assert ("POST", "/event", 200) in requests_seen and ("POST", "/event", 400) in requests_seen
    assert ("GET", "/stats", 200) in requests_seen
    assert all("127.0.0.1" not in orjson.dumps(line).decode() for line in access)
    errors = json_lines(logs / "gunicorn.err")
    assert {"gunicorn.error", "ingestion_api"} <= {line["logger"] for line in errors}
    first(errors, "Booting worker")
    first(errors, "Shutting down")


def summer_time_ending_at(end):
    """A POSIX TZ of UTC+1 summer time that ends, the clocks going back an hour, at end (UTC)."""
    day = end.timetuple().tm_yday - 1      # days since 1 January, 29 February counted
    local = end + timedelta(hours=1) - datetime(end.year, end.month, end.day, tzinfo=timezone.utc)
    hours, seconds = divmod(int(local.total_seconds()), 3600)
    return f"WIN0SUM-1,0/0,{day}/{hours}:{seconds // 60:02d}:{seconds % 60:02d}"


def api_whose_summer_time_ends_soon(data_dir):
    """(api, end): gunicorn ready in a zone whose clocks go back at end, a few seconds ahead."""
    for seconds_ahead in (8, 30):           # the longer one for a machine slow to start gunicorn
        end = datetime.now(timezone.utc) + timedelta(seconds=seconds_ahead)
        api = Api(data_dir, workers=1, LOG_FORMAT="json", TZ=summer_time_ending_at(end))
        if datetime.now(timezone.utc) < end - timedelta(seconds=2):
            return api, end
        assert stop(api.process, signal.SIGTERM) == 0
    raise AssertionError(f"gunicorn took more than {seconds_ahead - 2} s to start")


def test_a_request_s_duration_in_the_access_log_is_not_moved_by_the_clocks_going_back(data_dir):
    """The server's local time goes back an hour while a request is served (the end of summer
    time; a clock stepped back does the same): the request still took seconds, not a day."""
    api, end = api_whose_summer_time_ends_soon(data_dir)
    try:
        body = b'{"site_id": "s", "event_type": "page_view"}'
        with socket.create_connection(("127.0.0.1", api.port), timeout=30) as connection:
            started = time.monotonic()
            connection.sendall(b"POST /event HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                               b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
            time.sleep(max(0.0, (end - datetime.now(timezone.utc)).total_seconds()) + 0.5)
            connection.sendall(body[10:])
            assert connection.recv(1024).startswith(b"HTTP/1.1 200")
            took = time.monotonic() - started
    finally:
        assert stop(api.process, signal.SIGTERM) == 0
    [line] = [line for line in json_lines(data_dir.parent / "logs" / "gunicorn.out")
              if line["path"] == "/event"]
    assert 0 < line["duration_ms"] <= took * 1000, (line["duration_ms"], took)


TEXT_LINE = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z %s ingestion_api \[%s\] %s"
BOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


def send_bot_event(url):
    response = requests.post(url + "/api/event", headers={"User-Agent": BOT}, timeout=10,
                             json={"name": "pageview", "url": "https://example.test/", "domain": "example.test"})
    assert response.headers["X-Analytics-Dropped"] == "bot"


def assert_text_lines_of_the_app(text, pid):
    """INFO lines are there, and every line has its time, level, logger and process id."""
    assert re.search(TEXT_LINE % ("INFO", pid, "dropped event reason=bot user_agent='Mozilla"), text, re.M), text
    assert re.search(TEXT_LINE % ("WARNING", r"\d+", "no API keys are set"), text, re.M), text
    assert not re.search(r"^no API keys", text, re.M), text


def test_gunicorn_in_text_mode_logs_the_apps_info_lines_with_time_level_logger_and_pid(data_dir):
    api = Api(data_dir, workers=1)
    try:
        send_bot_event(api.url)
        [worker] = api.worker_pids()
    finally:
        assert stop(api.process, signal.SIGTERM) == 0
    assert_text_lines_of_the_app((data_dir.parent / "logs" / "gunicorn.err").read_text(), worker)


def test_python_ingestion_api_logs_the_apps_info_lines_with_time_level_logger_and_pid_not_the_client_address(
        data_dir):
    """Nor terminal colours: werkzeug styles the status of a 4xx request line, and its start
    banner, even into a file."""
    port = free_port()
    log_file = data_dir.parent / "api.err"
    with open(log_file, "w") as err:
        api = subprocess.Popen([sys.executable, "ingestion_api.py"], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=err, env=environment(data_dir, PORT=port), start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: is_healthy(url), 30, "the API did not start")
        send_bot_event(url)
        assert requests.get(f"{url}/stats").status_code == 400
    finally:
        stop(api, signal.SIGTERM)
    assert_text_lines_of_the_app(log_file.read_text(), api.pid)
    requests_logged = [line for line in log_file.read_text().splitlines() if "/api/event" in line
                       or "GET /stats" in line]
    assert len(requests_logged) == 2
    assert not any("127.0.0.1" in line for line in requests_logged)
    assert "\x1b" not in log_file.read_text()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_gunicorn_s_log_files_get_the_apps_lines_too_and_are_reopened_on_sigusr1(data_dir, log_format):
    """gunicorn --error-logfile / --access-logfile, rotated as logrotate does: rename, then SIGUSR1."""
    folder = data_dir.parent
    errors, access = folder / "api-error.log", folder / "api-access.log"
    api = Api(data_dir, workers=2, LOG_FORMAT=log_format,
              GUNICORN_CMD_ARGS=f"--error-logfile {errors} --access-logfile {access}")
    try:
        send_bot_event(api.url)
        errors.rename(folder / "api-error.log.1")
        access.rename(folder / "api-access.log.1")
        os.kill(api.process.pid, signal.SIGUSR1)
        wait_for(lambda: send_bot_event(api.url) or "reason=bot" in read(errors), 30,
                 "an app line in the reopened error log")
    finally:
        assert stop(api.process, signal.SIGTERM) == 0
    for rotated in (folder / "api-error.log.1", errors):
        assert "dropped event reason=bot" in rotated.read_text()
    assert "Booting worker" in (folder / "api-error.log.1").read_text()
    assert "GET /health" in (folder / "api-access.log.1").read_text()       # the wait for gunicorn
    assert "POST /api/event" in access.read_text()
    assert "reason=bot" not in (folder / "logs" / "gunicorn.err").read_text()
    if log_format == "json":
        for log in (errors, access, folder / "api-error.log.1", folder / "api-access.log.1"):
            json_lines(log)
        assert {line["logger"] for line in json_lines(access)} == {"gunicorn.access"}


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGWINCH], ids=lambda sig: sig.name)
def test_a_signal_in_the_middle_of_a_write_spoils_no_line_and_no_request(data_dir, sig):
    """logrotate may signal a worker while it writes a log line: the reopen happens inside
    the signal handler, on the very stream being written. A terminal resized sends SIGWINCH
    to every process of gunicorn, workers included, whose handler logs at DEBUG. (Either
    format; JSON lines show any line that is not whole.)"""
    folder = data_dir.parent
    errors, access = folder / "api-error.log", folder / "api-access.log"
    api = Api(data_dir, workers=1, LOG_FORMAT="json", LOG_LEVEL="DEBUG",
              GUNICORN_CMD_ARGS=f"--error-logfile {errors} --access-logfile {access}")
    [worker] = api.worker_pids()
    statuses, sending = [], threading.Event()
    sending.set()

    def send_bot_events():
        with requests.Session() as session:
            while sending.is_set():
                try:
                    statuses.append(session.post(
                        api.url + "/api/event", headers={"User-Agent": BOT}, timeout=10,
                        json={"name": "pageview", "url": "https://example.test/", "domain": "example.test"},
                    ).status_code)
                except requests.RequestException as error:      # a worker that died mid-request
                    statuses.append(repr(error))

    sender = threading.Thread(target=send_bot_events)
    sender.start()
    try:
        for _ in range(1000):
            os.kill(api.process.pid if sig == signal.SIGUSR1 else worker, sig)
            time.sleep(0.005)
    finally:
        sending.clear()
        sender.join()
        assert stop(api.process, signal.SIGTERM) == 0
    assert len(statuses) > 100 and set(statuses) == {202}
    error_log = errors.read_text()
    assert "Logging error" not in error_log and "Traceback" not in error_log, error_log[-3000:]
    json_lines(errors)
    assert len(json_lines(access)) >= len(statuses)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_gunicorn_still_sends_its_statsd_metrics_when_asked(data_dir, log_format):
    """gunicorn swaps in its statsd logger only for its default logger class, not for ours."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as statsd:
        statsd.bind(("127.0.0.1", 0))
        statsd.settimeout(30)
        api = Api(data_dir, workers=1, LOG_FORMAT=log_format,
                  GUNICORN_CMD_ARGS=f"--statsd-host 127.0.0.1:{statsd.getsockname()[1]}")
        try:
            wait_for(lambda: b"gunicorn.requests" in statsd.recv(1000), 30, "a request metric")
        finally:
            assert stop(api.process, signal.SIGTERM) == 0


def test_gunicorn_s_access_log_in_text_mode_never_carries_the_client_address(data_dir):
    access = data_dir.parent / "api-access.log"
    api = Api(data_dir, workers=1, GUNICORN_CMD_ARGS=f"--access-logfile {access}")
    try:
        send_bot_event(api.url)
    finally:
        assert stop(api.process, signal.SIGTERM) == 0
    [line] = [line for line in access.read_text().splitlines() if "/api/event" in line]
    assert '"POST /api/event HTTP/1.1" 202' in line and BOT in line
    assert "127.0.0.1" not in line


def read(path):
    return path.read_text() if path.exists() else ""


def send_bad_request_line(url):
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as connection:
        connection.sendall(b"NOT HTTP\r\n\r\n")
        connection.recv(100)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_gunicorn_s_own_lines_never_carry_the_client_address(data_dir, log_format):
    api = Api(data_dir, workers=1, LOG_FORMAT=log_format)
    try:
        send_bad_request_line(api.url)
    finally:
        assert stop(api.process, signal.SIGTERM) == 0
    lines = (data_dir.parent / "logs" / "gunicorn.err").read_text().splitlines()
    [invalid] = [line for line in lines if "Invalid request" in line]
    assert "127.0.0.1" not in invalid


def send_raw(url, request):
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as connection:
        connection.sendall(request)
        return connection.recv(100)


def test_what_a_client_sends_in_a_request_gunicorn_refuses_makes_no_json_field(data_dir):
    api = Api(data_dir, workers=1, LOG_FORMAT="json")
    try:
        answer = send_raw(api.url, b"GET /health HTTP/1.1\r\nHost: x\r\nsent status=200 path=/admin reason=bot\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400")
    finally:
        assert stop(api.process, signal.SIGTERM) == 0
    [invalid] = [line for line in json_lines(data_dir.parent / "logs" / "gunicorn.err")
                 if line["message"].startswith("Invalid request")]
    assert invalid["message"] == ("Invalid request from a client: "
                                  "Invalid HTTP Header: 'sent status=200 path=/admin reason=bot'")
    assert set(invalid) == BASIC_FIELDS


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_an_api_key_in_a_header_gunicorn_refuses_is_not_logged(data_dir, log_format):
    """A header line without its colon is logged whole by gunicorn, key and all."""
    api = Api(data_dir, workers=1, LOG_FORMAT=log_format, API_KEYS="key-in-a-bad-header")
    try:
        for header in (b"Authorization Bearer key-in-a-bad-header", b"authorization:Bearer key-in-a-bad-header\x01",
                       b"Proxy-Authorization Basic key-in-a-bad-header"):
            assert send_raw(api.url, b"GET /stats/sites HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n"
                            ).startswith(b"HTTP/1.1 400")
    finally:
        assert stop(api.process, signal.SIGTERM) == 0
    lines = (data_dir.parent / "logs" / "gunicorn.err").read_text().splitlines()
    invalid = [line for line in lines if "Invalid request" in line]
    assert len(invalid) == 3 and "Authorization ***" in invalid[0]
    assert not [line for line in lines if "key-in-a-bad-header" in line]


def test_a_long_header_gunicorn_refuses_is_logged_in_json_whole_and_without_its_fields():
    # gunicorn writes the header into the message; read for key=value fields, 20,000 letters
    # took 3 s (bench/ is where such costs are measured; the pattern now reads a word once)
    record = logging.LogRecord("gunicorn.error", logging.WARNING, __file__, 1,
                               "Invalid request from ip=203.0.113.9: Invalid HTTP Header: '" + "a" * 20_000 + "'",
                               (), None)
    assert scrub(record)
    line = orjson.loads(JsonFormatter().format(record))
    assert set(line) == BASIC_FIELDS
    assert line["message"] == "Invalid request from a client: Invalid HTTP Header: '" + "a" * 20_000 + "'"


def test_the_processor_log_rotates_at_its_size_and_keeps_five_old_files(data_dir):
    queue = open_queue(load_config(environ={}, data_dir=str(data_dir)))
    queue.append([b"not json\n"] * 300)        # a dead-letter warning of ~100 bytes a batch
    queue.close()
    run_processor_once(data_dir, PROCESSOR_LOG_MAX_BYTES=4000, PROCESSOR_BATCH_SIZE=1)
    logs = sorted(data_dir.glob("processor.log*"))
    assert [path.name for path in logs] == ["processor.log"] + [f"processor.log.{n}" for n in range(1, 6)]
    assert all(path.stat().st_size <= 4000 for path in logs)
    assert "processor stopped stored=0 dead_letters=300" in (data_dir / "processor.log").read_text()


def test_with_rotation_off_a_log_moved_away_is_written_anew(data_dir):
    log_file = data_dir / "processor.log"
    process = start_processor(data_dir, PROCESSOR_LOG_MAX_BYTES=0)
    try:
        wait_for(lambda: log_file.exists() and "processor started" in log_file.read_text(), 30,
                 "the processor did not start")
        log_file.rename(data_dir / "processor.log.old")     # as logrotate does
        assert stop(process, signal.SIGTERM) == 0
    finally:
        stop(process)
    assert "processor stopped" in log_file.read_text()
    assert "processor stopped" not in (data_dir / "processor.log.old").read_text()


@pytest.mark.parametrize("max_bytes", [4000, 0], ids=["rotated here", "never rotated here"])
def test_the_processor_log_quotes_events_so_it_is_made_the_owner_s_alone_like_the_dead_letters(
        data_dir, max_bytes):
    queue = open_queue(load_config(environ={}, data_dir=str(data_dir)))
    queue.append([b'{"user_id": "user-42"}\n'] * 300)        # dead letters, quoted in the log
    queue.close()
    umask = os.umask(0o022)      # the usual one, which leaves new files readable by every user
    try:
        run_processor_once(data_dir, PROCESSOR_LOG_MAX_BYTES=max_bytes, PROCESSOR_BATCH_SIZE=1)
    finally:
        os.umask(umask)
    logs = sorted(data_dir.glob("processor.log*"))
    assert "user-42" in logs[0].read_text()
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in logs} == {
        path.name: "0o600" for path in logs}
    assert oct((data_dir / "dead_letter.jsonl").stat().st_mode & 0o777) == "0o600"


def test_a_log_file_the_operator_made_keeps_the_mode_given_it(data_dir):
    log_file = data_dir / "processor.log"
    log_file.touch(mode=0o640)      # readable by the group that reads the logs
    log_file.chmod(0o640)
    run_processor_once(data_dir)
    assert "processor stopped" in log_file.read_text()
    assert oct(log_file.stat().st_mode & 0o777) == "0o640"


WRITER = """
import logging, os, sys, time
from config import load_config
from processor import setup_logging
setup_logging(load_config(environ={"PROCESSOR_LOG_MAX_BYTES": "4000"}, data_dir=sys.argv[1]))
open(sys.argv[1] + "/ready-" + sys.argv[2], "w").close()
while not os.path.exists(sys.argv[1] + "/go"):
    time.sleep(0.01)
for number in range(100):
    logging.getLogger("processor").info("writer=%s line=%d", sys.argv[2], number)
    time.sleep(0.002)
"""


def test_processors_that_share_the_log_file_rotate_it_without_losing_a_line(data_dir):
    # processors of a Redis queue on one machine share DATA_DIR, so processor.log too
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(data_dir), str(writer)],
                                cwd=REPO, stderr=subprocess.DEVNULL) for writer in range(3)]
    wait_for(lambda: all((data_dir / f"ready-{writer}").exists() for writer in range(3))
             or any(writer.poll() is not None for writer in writers), 30, "the writers did not start")
    (data_dir / "go").touch()       # all three write at once
    assert [writer.wait(timeout=60) for writer in writers] == [0, 0, 0]
    files = sorted(data_dir.glob("processor.log*"))
    assert 3 <= len(files) <= 6     # rotated, and five older files hold every line written here
    lines = [line for path in files for line in path.read_text().splitlines()]
    written = sorted((writer, number) for writer in range(3) for number in range(100))
    assert sorted((int(line.split("writer=")[1].split()[0]), int(line.split("line=")[1]))
                  for line in lines) == written


@pytest.mark.parametrize("max_bytes", [4000, 0], ids=["rotated here", "rotated by logrotate"])
def test_a_line_logged_after_the_log_was_moved_away_while_the_disk_was_full_never_fails_the_caller(
        data_dir, max_bytes):
    """The lines the full disk had no room for stay in the file's buffer; closing the file moved
    away (by another processor's rotation, or logrotate) to open the new one raised their error
    in whatever the processor was logging from, and stopped it."""
    config = load_config(environ={"PROCESSOR_LOG_MAX_BYTES": str(max_bytes)}, data_dir=str(data_dir))
    log_file = data_dir / "processor.log"

    def log_on_a_full_disk_then_after_a_move_then_with_room():
        handler = log_file_handler(config)
        handler.handleError = lambda record: None       # what the standard handlers do, quietly
        logger = logging.getLogger("moved-away")
        logger.addHandler(handler)
        logger.warning("a line the full disk has no room for: %s", "x" * 1000)
        log_file.rename(data_dir / "processor.log.1")
        try:
            logger.warning("a line after the move")
        except OSError as error:
            return error.strerror
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        logger.warning("a line with room")
        return "logged"

    assert in_a_child_that_may_not_write_past(
        500, log_on_a_full_disk_then_after_a_move_then_with_room) == "logged"
    assert log_file.read_text().endswith("a line with room\n")


def processor_once(data_dir, log_file):
    return subprocess.run([sys.executable, "processor.py", "--once"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=environment(data_dir, PROCESSOR_LOG_FILE=log_file))


def test_a_log_file_that_cannot_be_opened_is_named_in_one_line_not_a_traceback(data_dir):
    missing = data_dir / "no such folder" / "processor.log"
    result = processor_once(data_dir, missing)
    assert result.returncode == 2
    assert result.stderr == f"cannot open the log file (PROCESSOR_LOG_FILE): {missing}: No such file or directory\n"


def test_a_lock_file_that_cannot_be_made_is_the_file_named(data_dir):
    log_file = data_dir / "processor.log"
    lock = data_dir / ".processor.log.lock"
    lock.mkdir()        # a directory cannot be opened for writing, even by root
    result = processor_once(data_dir, log_file)
    assert result.returncode == 2
    assert result.stderr == f"cannot open the log file (PROCESSOR_LOG_FILE): {lock}: Is a directory\n"


def test_a_warning_repeated_during_an_outage_is_one_line_that_counts_the_rest(caplog, monkeypatch):
    import logs
    now = [1000.0]
    monkeypatch.setattr(logs, "time", SimpleNamespace(monotonic=lambda: now[0]))     # its clock
    failures = logs.EverySoOften(logging.getLogger("ingestion_api"), seconds=10)
    for seconds in (0, 1, 5, 9.9, 9.99):
        now[0] = 1000.0 + seconds
        failures.warning("queue append failed: %s", "disk full")
    now[0] = 1010.5
    failures.warning("queue append failed: %s", "disk full")
    assert [record.getMessage() for record in caplog.records] == [
        "queue append failed: disk full",
        "queue append failed: disk full (4 more like it since the last line)"]
