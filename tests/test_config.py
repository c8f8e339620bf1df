"""Settings: a bad value stops the program at start, naming the variable; good ones pass."""
import ipaddress
import subprocess
import sys

import pytest

from config import ConfigurationError, load_config
from processes import REPO, Api, environment, free_port, is_healthy, log_tail, stop, wait_for
from redis_queue import RedisQueue


@pytest.mark.parametrize("name, value", [
    ("PORT", "70000"), ("PORT", "0"),
    ("PROCESSOR_POLL_INTERVAL", "nan"), ("PROCESSOR_POLL_INTERVAL", "inf"),
    ("RETENTION_INTERVAL", "1e12"), ("FSYNC_INTERVAL", "nan"), ("QUEUE_CLAIM_IDLE", "inf"),
    ("PROCESSOR_BATCH_SIZE", "99999999999999999999"), ("RETENTION_BATCH_SIZE", "3000000000"),
    ("MAX_BODY_BYTES", "0"), ("MAX_BATCH_EVENTS", "-1"),
    ("RETENTION_DAYS", "1000000"), ("ROLLUP_RETENTION_DAYS", "99999999999"),
    ("REPORT_MAX_DAYS", "3652059"), ("REPORT_MAX_DAYS", "0"),
    ("RATE_LIMIT", "0/minute"), ("RATE_LIMIT", "10/second; 0/minute"),
    ("API_KEYS", "good-key \u043a\u043b\u044e\u0447"), ("API_KEYS", " , "),
    ("SITES", " , "), ("SITES", "site1 " + "x" * 257),
    # a wildcard in a name, a path, a page's null origin: no browser sends such an Origin as meant
    ("CORS_ORIGINS", "https://*.example.com"), ("CORS_ORIGINS", "https://dash.example/reports"),
    ("CORS_ORIGINS", "dash.example"), ("CORS_ORIGINS", "null"), ("CORS_ORIGINS", "https://dash.example?x"),
    ("CORS_ORIGINS", "https://dash.example:port"), ("CORS_ORIGINS", "https://user@dash.example"),
])
def test_a_value_the_program_cannot_run_with_is_refused_by_name(name, value):
    with pytest.raises(ConfigurationError, match=name):
        load_config(environ={name: value})


@pytest.mark.parametrize("name, value, expected", [
    ("PORT", "abc", "must be a port number from 1 to 65535"),
    ("MAX_BODY_BYTES", "64k", "must be a positive whole number up to"),
    ("RETENTION_DAYS", "30d", "must be a number of days up to"),
    ("PROCESSOR_LOG_MAX_BYTES", "10MiB", "must be a number of bytes, or 0 to never rotate"),
    ("REPORT_MAX_DAYS", "1.5", "must be a number of days from 1 to"),
    ("FSYNC_INTERVAL", "abc", "must be a positive number of seconds up to"),
])
def test_a_value_that_is_no_number_is_told_the_number_it_must_be(name, value, expected):
    with pytest.raises(ConfigurationError) as refused:
        load_config(environ={name: value})
    assert f"{name}={value!r} is not valid: {expected}" in str(refused.value)
    assert "invalid literal" not in str(refused.value) and "convert" not in str(refused.value)


@pytest.mark.parametrize("port", ["6000 ", " 6000", "6_000", "+6000"])
def test_a_port_with_more_than_digits_is_refused_as_gunicorn_would_not_listen_on_it(port):
    """int() reads each as 6000, but gunicorn.conf.py binds a PORT of digits alone and put the
    others aside for 5000, without a word: gunicorn listened on 5000, python ingestion_api.py on 6000."""
    with pytest.raises(ConfigurationError) as refused:
        load_config(environ={"PORT": port})
    assert f"PORT={port!r} is not valid: must be a port number from 1 to 65535" in str(refused.value)


@pytest.mark.parametrize("text, level", [("debug", "DEBUG"), ("Warning", "WARNING"), ("ERROR", "ERROR")])
def test_log_level_is_read_in_any_case_as_gunicorns_is(text, level):
    assert load_config(environ={"LOG_LEVEL": text}).log_level == level


@pytest.mark.parametrize("name, value", [("API_KEYS", " , "), ("API_KEYS_FILE", "/nonexistent/keys")])
def test_the_advice_for_a_bad_key_setting_says_that_without_it_reports_are_public(name, value):
    with pytest.raises(ConfigurationError) as refused:
        load_config(environ={name: value})
    assert "unset it to make reports public" in str(refused.value)
    assert "to use the default" not in str(refused.value)


def test_cors_origins_are_written_as_browsers_send_them():
    config = load_config(environ={"CORS_ORIGINS": "https://Dash.Example/, http://[::1]:8080 *"})
    assert config.cors_origins == ("https://dash.example", "http://[::1]:8080", "*")


def test_a_data_dir_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(ConfigurationError, match="DATA_DIR=.* no such directory"):
        load_config(environ={"DATA_DIR": str(tmp_path / "missing")})


def test_an_api_keys_file_with_a_key_no_header_can_carry_is_refused(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("ascii-key\ncl\u00e9\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="API_KEYS_FILE.*ASCII"):
        load_config(environ={"API_KEYS_FILE": str(keys)})


def test_the_largest_values_that_make_sense_are_accepted():
    config = load_config(environ={"PORT": "65535", "PROCESSOR_POLL_INTERVAL": "86400",
                                  "RETENTION_DAYS": "36500", "PROCESSOR_BATCH_SIZE": "2147483647",
                                  "RATE_LIMIT": "1/minute", "REPORT_MAX_DAYS": "36500"})
    assert (config.port, config.poll_interval, config.retention_days, config.report_max_days) == \
        (65535, 86400, 36500, 36500)


def test_sites_are_a_list_of_ids_and_unset_takes_every_site():
    assert load_config(environ={"SITES": " site1,example.com  www.Shop.test,"}).sites == \
        {"site1", "example.com", "www.Shop.test"}
    assert load_config(environ={"SITES": ""}).sites == load_config(environ={}).sites == frozenset()
    assert load_config(environ={"SITES": "x" * 256}).sites == {"x" * 256}    # as long as a site_id may be


def test_api_keys_and_an_api_keys_file_add_up(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("file-key\n")
    assert load_config(environ={"API_KEYS": "env-key", "API_KEYS_FILE": str(keys)}).api_keys == \
        ("env-key", "file-key")


def test_a_trusted_proxy_network_written_with_host_bits_is_that_network():
    config = load_config(environ={"TRUSTED_PROXIES": "10.1.2.3/8, 2001:db8::1/32 unix 192.0.2.7"})
    assert config.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"),
                                      "unix", ipaddress.ip_network("192.0.2.7/32"))


@pytest.mark.parametrize("host, address", [
    ("", "127.0.0.1"),      # unset, as for python ingestion_api.py: never every interface
    ("::1", "[::1]"),       # an IPv6 address, as python ingestion_api.py takes it
    ("[::1]", "[::1]"),     # as gunicorn's -b takes it
])
def test_gunicorn_listens_on_host(tmp_path, host, address):
    port = free_port()
    env = environment(tmp_path, HOST=host, PORT=str(port), RATE_LIMIT="off")
    log = tmp_path / "gunicorn.err"
    with open(log, "wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "1", "ingestion_api:app"],
                                   cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                   start_new_session=True)
    try:
        wait_for(lambda: is_healthy(f"http://{address}:{port}") or process.poll() is not None, 30,
                 "gunicorn to answer")
        assert f"Listening at: http://{address}:{port}" in log.read_text(), log.read_text()
    finally:
        stop(process)


@pytest.mark.parametrize("port", ["abc", "0", "70000"])
def test_gunicorn_names_a_port_it_cannot_listen_on_as_the_setting(tmp_path, port):
    result = subprocess.run([sys.executable, "-m", "gunicorn", "ingestion_api:app"], cwd=REPO,
                            capture_output=True, text=True, timeout=60, env=environment(tmp_path, PORT=port))
    assert result.returncode == 2       # as the processor's: a service manager restarts neither
    assert f"configuration error: PORT='{port}' is not valid" in result.stderr, result.stderr


@pytest.mark.parametrize("command", [["ingestion_api.py"], ["-m", "gunicorn", "ingestion_api:app"]],
                         ids=["python", "gunicorn"])
@pytest.mark.parametrize("host", ["300.1.1.1", "no-such-host.invalid"])
def test_a_host_that_names_no_address_stops_the_api_at_start_naming_the_setting(tmp_path, command, host):
    """The servers said only 'Name or service not known', gunicorn after five tries and five seconds."""
    result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env=environment(tmp_path, HOST=host, PORT=free_port()))
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"configuration error: HOST='{host}' is not valid: no address has that name; expected an address of "
        f"this machine such as 127.0.0.1, 0.0.0.0 or ::1, or a name of one. Fix it or unset it to use the "
        f"default; see the settings table in README.md.")


def test_gunicorn_told_where_to_listen_by_b_does_not_look_host_up(tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "1", "-b", f"127.0.0.1:{port}",
                                "ingestion_api:app"], cwd=REPO, env=environment(tmp_path, HOST="300.1.1.1"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: is_healthy(f"http://127.0.0.1:{port}") or process.poll() is not None, 30,
                 "gunicorn to answer")
        assert process.poll() is None
    finally:
        stop(process)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0?strem=x", "redis://127.0.0.1:notaport/0",
                                 "redis://127.0.0.1:6379/0?stream=", "redis://127.0.0.1:6379/analytics",
                                 "rediss://127.0.0.1:6379/0/1"])
def test_a_queue_url_the_redis_client_cannot_use_is_refused_at_start(url):
    with pytest.raises(ConfigurationError, match="QUEUE_URL"):
        load_config(environ={"QUEUE_URL": url})


@pytest.mark.parametrize("url", [
    "postgresql://analytics:s3cr@t@127.0.0.1:5432/test",       # libpq takes "t@127.0.0.1" for the host
    "postgresql://analytics:s3cr/t@127.0.0.1:5432/test",       # ... and "s3cr" for the port
    "postgresql://analytics:s3cr%t@127.0.0.1:5432/test",
    "postgresql://analytics:s3cr t@127.0.0.1:5432/test",
    "postgresql://analytics@127.0.0.1:notaport/test?password=s3cret",
    "postgresql://analytics@127.0.0.1:5432/test?strem=x&password=s3cret",
])
def test_a_database_url_libpq_cannot_read_is_refused_at_start_without_its_password(tmp_path, url):
    """libpq finds it out only when it connects: the programs waited for a server that was not down,
    logging libpq's message, with the password or a part of it, at every try."""
    with pytest.raises(ConfigurationError, match="DATABASE_URL") as refused:
        load_config(environ={"DATABASE_URL": url})
    assert "s3" not in str(refused.value)
    result = subprocess.run([sys.executable, "processor.py", "--once"], cwd=REPO, capture_output=True,
                            text=True, timeout=60, env=environment(tmp_path, DATABASE_URL=url))
    assert (result.returncode, result.stderr) == (2, f"configuration error: {refused.value}\n")


@pytest.mark.parametrize("name, url", [("DATABASE_URL", "mysql://root@127.0.0.1/analytics"),
                                       ("QUEUE_URL", "amqp://guest@127.0.0.1/")])
def test_a_url_of_a_kind_we_do_not_speak_is_refused_rather_than_taken_for_a_file(name, url):
    with pytest.raises(ConfigurationError, match=f"{name}.*expected a URL starting"):
        load_config(environ={name: url})


@pytest.mark.parametrize("name, value", [
    ("QUEUE_URL", "redis://:s3cret@127.0.0.1:notaport/0"),
    ("QUEUE_URL", "redis://:s3cr@et@127.0.0.1:notaport/0"),
    # a raw / ? or # ends the host early: the rest of the password is read as the path or the port
    ("QUEUE_URL", "redis://:pass/s3cret@127.0.0.1:6379/0"),
    ("QUEUE_URL", "redis://:s3cret?x@127.0.0.1:6379/0"),
    ("QUEUE_URL", "redis://:s3cret#x@127.0.0.1:6379/0"),
    ("QUEUE_URL", "unix:///run/redis.sock?password=s3cret&strem=x"),
    ("DATABASE_URL", "mysql://root:s3cret@127.0.0.1/analytics"),
    ("API_KEYS", "s3cret-key \u043a\u043b\u044e\u0447"),
])
def test_a_value_refused_is_named_without_the_secret_it_holds(name, value):
    """The line goes to the journal or a log file, which more people read than the settings."""
    with pytest.raises(ConfigurationError, match=name) as refused:
        load_config(environ={name: value})
    assert "s3" not in str(refused.value)


def test_a_unix_socket_queue_url_keeps_its_path():
    queue = RedisQueue("unix:///run/redis/redis.sock?db=2&stream=site-events")
    assert (queue.url, queue.stream) == ("unix:///run/redis/redis.sock?db=2", "site-events")
    connection = queue.client.connection_pool.make_connection()     # made, not connected
    assert connection.path == "/run/redis/redis.sock" and connection.db == 2


@pytest.mark.parametrize("url, described", [
    ("redis://:secret@cache.internal:6380/2?stream=site-events", "redis://cache.internal:6380/2 stream=site-events"),
    ("unix:///run/redis/redis.sock?db=2&password=secret", "unix:///run/redis/redis.sock?db=2 stream=analytics:events"),
    ("unix:///run/redis/redis.sock", "unix:///run/redis/redis.sock stream=analytics:events"),
])
def test_a_redis_queue_is_described_in_the_log_by_where_it_is_without_its_password(url, described):
    assert RedisQueue(url).describe() == described


def test_a_metrics_dir_that_cannot_be_made_stops_the_processor_in_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    result = subprocess.run([sys.executable, "processor.py", "--once"], cwd=REPO, capture_output=True,
                            text=True, timeout=60,
                            env=environment(tmp_path, METRICS_DIR=str(tmp_path / "a-file")))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"configuration error: METRICS_DIR cannot hold the metrics: "
                                     f"{tmp_path / 'a-file' / 'processor'}: Not a directory")


@pytest.mark.parametrize("command", [["processor.py", "--once"], ["ingestion_api.py"],
                                     ["-m", "gunicorn", "ingestion_api:app"]],
                         ids=["processor", "python", "gunicorn"])
def test_a_misspelled_setting_is_named_at_start_with_the_one_meant(tmp_path, command):
    """Taken for some other program's variable, it would leave the default in place without a word:
    here SQLite in DATA_DIR instead of the PostgreSQL server meant."""
    log = tmp_path / "stderr"
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, *command], cwd=REPO, stderr=stderr, start_new_session=True,
                                   env=environment(tmp_path, PORT=free_port(), DATABSE_URL="postgresql://db/x",
                                                   log_level="DEBUG"))
    try:
        wait_for(lambda: "log_level" in log.read_text(), 60, "the warnings")
    finally:
        stop(process)
    warnings = [line for line in log.read_text().splitlines() if "WARNING config" in line]
    assert len(warnings) == 2, warnings
    assert warnings[0].endswith("DATABSE_URL is not a setting; did you mean DATABASE_URL?")
    assert warnings[1].endswith("log_level is not a setting; did you mean LOG_LEVEL?")


@pytest.mark.parametrize("mode, warned", [(0o644, True), (0o640, True), (0o600, False), (0o400, False)])
def test_an_api_keys_file_other_users_may_read_is_warned_of_at_start(tmp_path, mode, warned):
    keys = tmp_path / "keys"
    keys.write_text("a-key\n")
    keys.chmod(mode)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    api = Api(data_dir, workers=1, API_KEYS_FILE=str(keys))
    api.stop()
    warnings = [line for line in log_tail(data_dir, "gunicorn", 20_000).splitlines() if str(keys) in line]
    expected = [f"WARNING config [{api.process.pid}] API_KEYS_FILE {keys} may be read by other users "
                f"(mode {mode:o}): chmod 600 it, so that only the user the API runs as reads its keys"]
    assert [line.split(" ", 1)[1] for line in warnings] == (expected if warned else [])
