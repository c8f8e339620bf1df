"""Rate limiting of ingestion per client IP: one limit for the fast path and Flask, shared by processes."""
import io
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import redis
from limits import parse_many

from config import ConfigurationError, load_config
from ingestion_api import create_app
from conftest import REDIS
from processes import stop, wait_for
from rate_limit import _SLOT
from test_queue import run_on_a_full_disk

ALL_BACKENDS = True
EVENT = b'{"site_id":"s","event_type":"page_view"}'


def post(client, path="/event", address="203.0.113.5", chunked=False, headers=None):
    """chunked: no Content-Length, so Flask's route answers instead of the fast path."""
    # werkzeug's test client gives an input_stream a Content-Length of its own: taken out
    chunked_body = {"wsgi.input_terminated": True, "CONTENT_LENGTH": ""}
    body = {"input_stream": io.BytesIO(EVENT), "environ_overrides": chunked_body} \
        if chunked else {"data": EVENT}
    return client.post(path, environ_base={"REMOTE_ADDR": address}, headers=headers or {}, **body)


@pytest.fixture
def limited(config):
    return config.with_overrides(rate_limit="3/minute")


@pytest.mark.embedded
def test_over_the_limit_is_429_json_with_retry_after(limited):
    client = create_app(limited).test_client()
    for _ in range(3):
        assert post(client).status_code == 200
    response = post(client)
    assert response.status_code == 429
    assert list(response.get_json()) == ["error"]
    assert "3 per 1 minute" in response.get_json()["error"]
    assert 1 <= int(response.headers["Retry-After"]) <= 60


@pytest.mark.embedded
def test_fast_path_and_flask_routes_count_in_one_bucket_and_answer_alike(limited):
    client = create_app(limited).test_client()
    assert post(client).status_code == 200
    assert post(client, chunked=True).status_code == 200
    assert post(client, "/events").status_code == 400     # a request all the same: counted
    fast, routed = post(client), post(client, chunked=True)
    assert fast.status_code == routed.status_code == 429
    assert fast.get_json() == routed.get_json()
    assert fast.headers["Content-Type"] == routed.headers["Content-Type"] == "application/json"


@pytest.mark.embedded
def test_plausible_endpoint_is_limited_and_keeps_its_cors_header(limited):
    client = create_app(limited).test_client()
    for _ in range(3):
        post(client, "/api/event")
    response = post(client, "/api/event")
    assert response.status_code == 429
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert client.options("/api/event").status_code == 204      # preflights are not counted


@pytest.mark.embedded
def test_preflights_do_not_use_up_the_limit(limited):
    client = create_app(limited).test_client()
    for _ in range(5):
        assert client.options("/api/event", environ_base={"REMOTE_ADDR": "203.0.113.5"}).status_code == 204
    assert 429 not in [post(client, "/api/event").status_code for _ in range(3)]
    assert post(client, "/api/event").status_code == 429


@pytest.mark.embedded
def test_retry_after_is_never_0(config):
    client = create_app(config.with_overrides(rate_limit="1/second")).test_client()
    for _ in range(100):        # a window may end between two requests: until one is over the limit
        response = post(client)
        if response.status_code == 429:
            break
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"


@pytest.mark.embedded
def test_only_ingestion_is_limited(limited):
    client = create_app(limited).test_client()
    for _ in range(4):
        post(client)
    assert post(client).status_code == 429
    for path in ("/health", "/stats?site_id=s", "/stats/sites", "/js/script.js"):
        for _ in range(4):
            assert client.get(path, environ_base={"REMOTE_ADDR": "203.0.113.5"}).status_code == 200


@pytest.mark.embedded
def test_each_client_address_has_its_own_limit(limited):
    client = create_app(limited).test_client()
    for _ in range(3):
        post(client, address="198.51.100.1")
    assert post(client, address="198.51.100.1").status_code == 429
    assert post(client, address="198.51.100.2").status_code == 200


@pytest.mark.embedded
@pytest.mark.parametrize("one_client, another", [
    # one subscriber gets a /64 and may send from any address in it
    (("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2:abcd::9"),
     "2001:db8:1:3::1"),
    # a socket bound to [::] gives IPv4 peers as ::ffff:a.b.c.d
    (("::ffff:198.51.100.1", "198.51.100.1", "::ffff:198.51.100.1", "198.51.100.1"), "::ffff:198.51.100.2"),
])
def test_a_client_is_counted_by_its_ipv4_address_or_its_64_bit_ipv6_network(limited, one_client, another):
    client = create_app(limited).test_client()
    *allowed, over = one_client
    assert [post(client, address=address).status_code for address in allowed] == [200, 200, 200]
    assert post(client, address=over).status_code == 429
    assert post(client, address=another).status_code == 200


@pytest.mark.embedded
def test_forwarded_address_counts_only_behind_a_trusted_proxy(limited):
    trusted = load_config(environ={"TRUSTED_PROXIES": "10.0.0.0/8"}).trusted_proxies
    client = create_app(limited.with_overrides(trusted_proxies=trusted)).test_client()
    for number in range(5):     # five visitors behind one proxy
        forwarded = {"X-Forwarded-For": f"198.51.100.{number}"}
        assert post(client, address="10.0.0.1", headers=forwarded).status_code == 200
    for number in range(3):     # a client forging the header is still one address
        post(client, headers={"X-Forwarded-For": f"192.0.2.{number}"})
    assert post(client, headers={"X-Forwarded-For": "192.0.2.9"}).status_code == 429


def test_the_limit_is_shared_by_every_api_process_of_the_install(limited):
    """Two apps on one queue stand for two gunicorn workers (file) or two nodes (Redis)."""
    first, second = create_app(limited).test_client(), create_app(limited).test_client()
    assert [post(client).status_code for client in (first, second, first)] == [200, 200, 200]
    assert post(second).status_code == 429
    assert post(first, chunked=True).status_code == 429


def test_redis_never_holds_the_client_address_in_a_counter_key(tmp_path, redis_stream):
    """The counters' keys reach Redis's AOF on disk: a client is known there by a keyed hash."""
    config = load_config(environ={}, data_dir=str(tmp_path), queue_url=redis_stream, rate_limit="3/minute")
    client = create_app(config).test_client()
    for chunked in (False, True):       # the fast path, then a Flask route
        assert post(client, address="203.0.113.77", chunked=chunked).status_code == 200
    server = redis.Redis.from_url(REDIS)
    keys = [key.decode() for key in server.scan_iter(f"LIMITS:*{redis_stream.split('stream=')[1]}*")]
    try:
        assert len(keys) == 1, keys         # both counted in one bucket
        assert "203.0.113.77" not in keys[0]
    finally:
        if keys:
            server.delete(*keys)


@pytest.fixture
def redis_on_a_unix_socket():
    """A redis-server of the test's own listening on a unix socket only, as QUEUE_URL=unix://... expects."""
    directory = Path(tempfile.mkdtemp(prefix="redis-"))     # short: a socket path holds 107 bytes at most
    socket_path = directory / "redis.sock"
    server = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(socket_path),
                               "--save", "", "--appendonly", "no", "--dir", str(directory)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = redis.Redis(unix_socket_path=str(socket_path))
    try:
        wait_for(lambda: socket_path.exists() and client.ping(), 15, "redis did not start")
        yield client
    finally:
        client.close()
        stop(server)
        shutil.rmtree(directory)


def test_a_queue_on_a_redis_unix_socket_keeps_the_counters_in_that_redis(tmp_path, redis_on_a_unix_socket):
    socket_path = redis_on_a_unix_socket.connection_pool.connection_kwargs["path"]
    config = load_config(environ={}, data_dir=str(tmp_path), queue_url=f"unix://{socket_path}?db=0",
                         rate_limit="2/minute")
    client = create_app(config).test_client()
    assert [post(client).status_code for _ in range(3)] == [200, 200, 429]
    assert redis_on_a_unix_socket.xlen("analytics:events") == 2
    assert len(list(redis_on_a_unix_socket.scan_iter("LIMITS:*"))) == 1


@pytest.mark.embedded
def test_counters_file_on_a_full_disk_lets_requests_in_and_logs_why_in_one_line(tmp_path):
    child = run_on_a_full_disk(tmp_path, f"""
        import io
        from config import load_config
        from ingestion_api import create_app
        from logs import log_to_stderr
        config = load_config(environ={{}}, data_dir={str(tmp_path)!r}, rate_limit="3/minute",
                             rate_limit_storage_url="sharedfile://" + full + "/ratelimit")
        log_to_stderr(config)
        client = create_app(config).test_client()
        fill_the_disk()
        fast = client.post("/event", data={EVENT!r})
        routed = client.post("/event", input_stream=io.BytesIO({EVENT!r}),
                             environ_overrides={{"wsgi.input_terminated": True}})
        print(fast.status_code, routed.status_code)
    """)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["200", "200"]
    failures = [line for line in child.stderr.splitlines() if "rate limit storage failed" in line]
    assert len(failures) == 1, child.stderr         # one line for the outage, not one per request
    assert all(" WARNING ingestion_api " in line and
               "requests let in: [Errno 28] No space left on device" in line for line in failures)
    assert "Traceback" not in child.stderr


@pytest.mark.embedded
def test_a_clock_stepped_back_does_not_stretch_a_window_in_the_counters_file(limited):
    """NTP or a VM's host may set the clock back: a window begun before that must not last
    the length of the step on top of its own (an hour's 429 for a limit per minute)."""
    client = create_app(limited).test_client()
    assert [post(client).status_code for _ in range(3)] == [200, 200, 200]
    counters = Path(limited.queue_path + ".ratelimit")
    table = bytearray(counters.read_bytes())
    stepped = 0
    for offset in range(0, len(table), _SLOT.size):
        key, window_end, count = _SLOT.unpack_from(table, offset)
        if count:       # the window as the clock, set back an hour since it began, sees it
            _SLOT.pack_into(table, offset, key, window_end + 3600, count)
            stepped += 1
    assert stepped == 1
    with counters.open("r+b") as file:      # in place: the app has the file mapped
        file.write(table)
    answers = [post(client) for _ in range(4)]
    assert [answer.status_code for answer in answers] == [200, 200, 200, 429]
    assert 1 <= int(answers[-1].headers["Retry-After"]) <= 60


@pytest.mark.embedded
def test_off_switch(config):
    """Off is no limit at all, not the default one: one client sends more than the default lets in."""
    default = min(item.amount for item in parse_many(config.rate_limit))
    client = create_app(config.with_overrides(rate_limit="")).test_client()
    assert all(post(client).status_code == 200 for _ in range(default + 1))


@pytest.mark.parametrize("text,limit", [("off", ""), ("OFF", ""), ("10/second", "10/second"),
                                        ("100/second; 3000/minute", "100/second; 3000/minute")])
def test_rate_limit_setting(text, limit):
    assert load_config(environ={"RATE_LIMIT": text}).rate_limit == limit


def test_a_bad_rate_limit_fails_at_start_saying_how_to_fix_it():
    with pytest.raises(ConfigurationError, match="RATE_LIMIT.*100/second"):
        load_config(environ={"RATE_LIMIT": "lots"})
