"""deploy/: the systemd units and the nginx site run as written, with this checkout in place of
/opt/analytics and ports of their own in place of the usual ones."""
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import uuid
import psutil
import pytest

from processes import REPO, Api, environment, exit_code, free_port, run_processor_once, stop, wait_for

DEPLOY = REPO / "deploy"
UNITS = ("analytics-api.service", "analytics-processor.service")
INSTALLED_AT = "/opt/analytics"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
NGINX = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
OPENSSL = shutil.which("openssl")


def rendered(text, replacements):
    """text with each key replaced by its value; a key no longer in the file fails the test."""
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in the file: update this test's rendering"
        text = text.replace(old, new)
    return text


def key_values(path):
    """The KEY=VALUE lines of a unit or an environment file, each key with its values in order."""
    settings = {}
    for line in path.read_text().splitlines():
        key, equals, value = line.partition("=")
        if equals and not line.startswith(("#", "[")):
            settings.setdefault(key, []).append(value)
    return settings


def env_file_settings():
    return {key: values[-1] for key, values in key_values(DEPLOY / "analytics.env").items()}


# -- systemd ---------------------------------------------------------------------------------

def test_the_units_pass_systemd_analyze_verify(tmp_path):
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed: run bash .ci/provision-nginx "
                    "(apt-get install systemd) to enable")
    for name in UNITS:
        (tmp_path / name).write_text(rendered((DEPLOY / name).read_text(), {INSTALLED_AT: str(REPO)}))
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", *(str(tmp_path / name) for name in UNITS)],
                            capture_output=True, text=True)
    # it only warns of a key it does not know or a value it cannot read, so its words count too
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "analytics-" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def untracked_files():
    listing = subprocess.run(["git", "ls-files", "--others", "--directory"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    return {path for path in listing if "__pycache__" not in path}


class Unit:
    """A unit's ExecStart run as a plain process with its WorkingDirectory and environment:
    the settings of deploy/analytics.env over Environment=, as systemd reads them (EnvironmentFile=
    wins), and the test's own over both."""

    def __init__(self, name, data_dir, **overrides):
        unit = key_values(DEPLOY / name)
        here = {INSTALLED_AT: str(REPO)}
        settings = dict(value.split("=", 1) for value in unit["Environment"])
        settings.update(env_file_settings())
        # the directory the unit may write to, which systemd makes for its user
        assert settings["DATA_DIR"] == f"/var/lib/{unit['StateDirectory'][-1]}", (
            "a DATA_DIR in analytics.env wins over the unit's, which alone it may write")
        settings.update(overrides, DATA_DIR=str(data_dir))
        self.kill_signal = signal.Signals[unit["KillSignal"][-1]]
        self.reload = unit.get("ExecReload", [None])[-1]
        self.log = data_dir.parent / f"{name}.log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                rendered(unit["ExecStart"][-1], here).split(),
                cwd=rendered(unit["WorkingDirectory"][-1], here), env=environment(data_dir, **settings),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

    def workers(self):
        return {child.pid for child in psutil.Process(self.process.pid).children()}

    def stop_as_systemd_does(self):
        """KillSignal to the main process (the API's KillMode=mixed: the master stops its workers)."""
        self.process.send_signal(self.kill_signal)
        return exit_code(self.process, 60)


def get_json(port, path):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_the_units_start_the_api_and_the_processor_which_store_an_event_and_stop_cleanly(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    port = free_port()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_address = f"@analytics-deploy-test-{uuid.uuid4().hex}"
    notify.bind("\0" + notify_address[1:])
    notify.settimeout(30)
    before = untracked_files()
    api = Unit("analytics-api.service", data_dir, PORT=port, NOTIFY_SOCKET=notify_address)
    processor = Unit("analytics-processor.service", data_dir)
    try:
        # Type=notify: systemd waits for this before it counts the API as started
        try:
            assert b"READY=1" in notify.recv(4096)
        except TimeoutError:
            pytest.fail("gunicorn did not say READY=1:\n" + api.log.read_text()[-2000:])

        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        event = json.dumps({"site_id": "unit", "event_type": "page_view"})
        connection.request("POST", "/event", body=event, headers={"Content-Type": "application/json"})
        assert connection.getresponse().status == 200
        wait_for(lambda: get_json(port, "/stats?site_id=unit")[1]["total_views"] == 1, 30,
                 "the processor to store the event")

        # ExecReload: new workers, and the API goes on answering
        workers, counted = api.workers(), get_json(port, "/stats?site_id=unit")
        subprocess.run(api.reload.replace("$MAINPID", str(api.process.pid)).split(), check=True)
        wait_for(lambda: not workers & api.workers(), 30, "new workers in place of the old after a reload")
        assert get_json(port, "/stats?site_id=unit") == counted

        assert processor.stop_as_systemd_does() == 0
        assert api.stop_as_systemd_does() == 0
    finally:
        stop(processor.process)
        stop(api.process)
        notify.close()
    # ProtectSystem=strict: the working directory is read-only; everything went to DATA_DIR
    assert untracked_files() == before
    assert (data_dir / "analytics.db").exists()


# -- nginx -----------------------------------------------------------------------------------

# workers as the user the tests run as (user is ignored unless that is root), who alone may
# write the temporary directory its bodies are buffered in
NGINX_CONF = """
user {user};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
worker_processes 1;
events {{}}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/site.conf;
}}
"""


class Site:
    """deploy/nginx-analytics.conf in an nginx of its own, in front of a gunicorn of one worker."""

    def __init__(self, prefix, api):
        self.prefix, self.port = prefix, free_port()
        certificate, key = prefix / "cert.pem", prefix / "key.pem"
        subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(certificate)], check=True, capture_output=True)
        self.tls = ssl.create_default_context(cafile=str(certificate))
        (prefix / "site.conf").write_text(rendered((DEPLOY / "nginx-analytics.conf").read_text(), {
            "listen 80;": f"listen 127.0.0.1:{free_port()};",
            "listen [::]:80;": "",
            "listen 443 ssl;": f"listen 127.0.0.1:{self.port} ssl;",
            "listen [::]:443 ssl;": "",
            "/etc/letsencrypt/live/analytics.example.com/fullchain.pem": str(certificate),
            "/etc/letsencrypt/live/analytics.example.com/privkey.pem": str(key),
            "http://127.0.0.1:5000": api.url,
        }))
        user = pwd.getpwuid(os.getuid()).pw_name
        (prefix / "nginx.conf").write_text(NGINX_CONF.format(prefix=prefix, user=user))
        self.process = subprocess.Popen(
            [NGINX, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(prefix / "nginx.conf"),
             "-g", "daemon off;"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_for(lambda: self.process.poll() is not None or self.answers(), 10, "nginx to start")
        assert self.process.poll() is None, (prefix / "error.log").read_text()

    def answers(self):
        try:
            return self.request("GET", "/health").status == 200
        except OSError:
            return False

    def request(self, method, path, body=None, client="127.0.0.10", headers=None, timeout=30):
        """A request from client, a loopback address of its own (as nginx sees it)."""
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.tls, timeout=timeout,
                                                 source_address=(client, 0))
        headers = {"Content-Type": "application/json", **(headers or {})}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.body = response.read()
        connection.close()
        return response

    def post_event(self, site_id, client="127.0.0.10", headers=None):
        event = json.dumps({"site_id": site_id, "event_type": "page_view"})
        return self.request("POST", "/event", event, client, headers).status

    def views(self, site_id):
        return json.loads(self.request("GET", f"/stats?site_id={site_id}").body)["total_views"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if NGINX is None or OPENSSL is None:
        pytest.skip("nginx or openssl is not installed: run bash .ci/provision-nginx "
                    "(apt-get install nginx openssl) to enable")
    root = tmp_path_factory.mktemp("nginx")
    data_dir = root / "data"
    data_dir.mkdir()
    api = Api(data_dir, workers=1, TRUSTED_PROXIES=env_file_settings()["TRUSTED_PROXIES"],
              RATE_LIMIT="2/hour")
    try:
        (root / "nginx").mkdir()
        site = Site(root / "nginx", api)
        try:
            site.data_dir = data_dir
            yield site
        finally:
            stop(site.process, signal.SIGTERM)
    finally:
        api.stop()


def test_an_event_sent_through_nginx_is_stored_and_counted(site):
    assert site.post_event("through-nginx") == 200
    run_processor_once(site.data_dir)
    assert site.views("through-nginx") == 1


def test_the_api_counts_each_client_by_the_address_nginx_forwards(site):
    # from the API's side every request comes from nginx, 127.0.0.1
    assert [site.post_event("limited", client="127.0.0.2") for _ in range(3)] == [200, 200, 429]
    assert site.post_event("limited", client="127.0.0.3") == 200
    # nor can a client claim another address: nginx replaces one header and drops the other
    claims = {"X-Forwarded-For": "192.0.2.1", "Forwarded": "for=192.0.2.1"}
    assert site.post_event("limited", client="127.0.0.3", headers=claims) == 200
    assert site.post_event("limited", client="127.0.0.3", headers=claims) == 429


def padded_event(site_id, size):
    """A valid event of exactly size bytes: JSON takes any number of blanks."""
    event = json.dumps({"site_id": site_id, "event_type": "page_view"})
    return event + " " * (size - len(event))


@pytest.mark.parametrize("size, clients", [(64 * 1024 + 1, "127.0.2"), (1024 * 1024, "127.0.3")])
def test_a_body_over_the_event_limit_but_not_nginx_gets_the_json_413_of_the_api(site, size, clients):
    # many times: an API that answered before it had the whole body made nginx's sending of the rest
    # fail, and nginx answered 502 in its place, about one time in seven
    for number in range(1, 41):        # each from an address of its own, under the rate limit
        response = site.request("POST", "/event", padded_event("large", size), client=f"{clients}.{number}")
        assert response.status == 413, response.body
        assert json.loads(response.body) == {"error": "Request body too large: at most 65536 bytes"}
        assert response.getheader("Access-Control-Allow-Origin") == "*"     # the API's own answer


def test_nginx_takes_the_largest_batch_the_api_does_and_refuses_a_larger_one_in_json(site):
    largest = "[" + padded_event("batch", 1024 * 1024 - 2) + "]"
    assert site.request("POST", "/events", largest, client="127.0.0.7").status == 200
    response = site.request("POST", "/events", largest + " ", client="127.0.0.7")
    assert response.status == 413
    assert response.getheader("Content-Type") == "application/json"
    assert json.loads(response.body) == {"error": "Request body too large: at most 1048576 bytes"}
    # as every answer of the API's ingest endpoints: a page of any site may read it, never as a script
    assert response.getheader("Access-Control-Allow-Origin") == "*"
    assert response.getheader("X-Content-Type-Options") == "nosniff"


def test_while_the_api_is_down_nginx_answers_a_json_503_to_retry(tmp_path):
    if NGINX is None or OPENSSL is None:
        pytest.skip("nginx or openssl is not installed: run bash .ci/provision-nginx to enable")
    (tmp_path / "data").mkdir()
    (tmp_path / "nginx").mkdir()
    api = Api(tmp_path / "data", workers=1)
    site = Site(tmp_path / "nginx", api)
    try:
        api.stop()          # a restart under way, or a crash
        response = site.request("POST", "/event", json.dumps({"site_id": "s", "event_type": "x"}))
        assert response.status == 503, response.body
        assert response.getheader("Content-Type") == "application/json"
        assert json.loads(response.body) == {"error": "The API is not answering: try again shortly"}
        assert response.getheader("Retry-After") == "5"
        assert response.getheader("Access-Control-Allow-Origin") == "*"
        assert response.getheader("X-Content-Type-Options") == "nosniff"
    finally:
        stop(site.process, signal.SIGTERM)
        api.stop()


def test_a_client_sending_its_body_slowly_does_not_hold_the_only_worker(site):
    event = json.dumps({"site_id": "slow", "event_type": "page_view"}).encode()
    raw = socket.create_connection(("127.0.0.1", site.port), timeout=30, source_address=("127.0.0.4", 0))
    with site.tls.wrap_socket(raw, server_hostname="127.0.0.1") as slow:
        slow.sendall(b"POST /event HTTP/1.1\r\nHost: analytics\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(event))
        half = len(event) // 2
        for byte in event[:half]:
            slow.sendall(bytes([byte]))
        try:
            # well within gunicorn's timeout (30 s), after which it would free a held worker
            assert site.request("GET", "/health", timeout=10).status == 200
        except TimeoutError:
            pytest.fail("a request waited while a slow client was sending its body: nginx passed it "
                        "on before reading it (proxy_request_buffering)")
        for byte in event[half:]:
            slow.sendall(bytes([byte]))
        answer = http.client.HTTPResponse(slow)
        answer.begin()
        assert answer.status == 200
    run_processor_once(site.data_dir)
    assert site.views("slow") == 1
