"""``netchan run CONFIG``: pipelines from a config file, used by curl,
reloaded without disturbing what did not change; bad configs refused with
the file, line and key; the metrics endpoint."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import netchan
from netchan.ops.config import ConfigError, parse_config
from netchan.tools.chaos import UdpChaos

from .helpers import echo_connection
from .test_tunnel_cli import _lines_until, _stop
from .test_tunnels import http_file, needs_curl, sha256_of_download

pytestmark = pytest.mark.async_timeout(90)


@contextlib.asynccontextmanager
async def _echo_server():
    server = await asyncio.start_server(echo_connection, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def _netchan(*args):
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "netchan", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        yield proc
    finally:
        await _stop(proc)


def _config(key, gateway, inner, direct_to, deep_to, extra=""):
    return f"""
identity = "{key}"
{extra}
[peers.gateway]
id = "{gateway.node_id}"
urls = {gateway.addresses!r}

[peers.inner]
id = "{inner.node_id}"
urls = {inner.addresses!r}

[[pipeline]]
name = "direct"
left = {{ listen = "127.0.0.1:0" }}
through = ["gateway"]
right = {{ connect = "{direct_to}" }}

[[pipeline]]
name = "deep"
left = {{ listen = "127.0.0.1:0" }}
through = ["gateway", "inner"]
right = {{ connect = "{deep_to}" }}
""".replace("'", '"')


def _peer(name, node):
    return f'[peers.{name}]\nid = "{node.node_id}"\nurls = {json.dumps(node.addresses)}\n'


def _echo_pipeline(name, through, echo_port):
    return (f'[[pipeline]]\nname = "{name}"\nleft = {{ listen = "127.0.0.1:0" }}\nthrough = {json.dumps(through)}\n'
            f'right = {{ connect = "127.0.0.1:{echo_port}" }}\n')


def _url(lines, what):
    """The http:// URL on netchan run's line that begins with ``what``."""
    return next(re.search(r"(http://\S+)", line).group(1) for line in lines if line.startswith(what))


def _pipelines(lines):
    """pipeline name -> the address it listens on, from netchan run's lines."""
    found = {}
    for line in lines:
        m = re.match(r"pipeline (\S+): listen \S+ at (\S+) ->", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def _my_key(tmp_path):
    me = netchan.Identity.generate()
    me.save(tmp_path / "me.key")
    return me


@contextlib.contextmanager
def _two_files(tmp_path):
    """Two web servers on loopback, a 1 MiB and a 2 MiB file: ((port, sha256), (port, sha256))."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    with http_file(tmp_path / "one", 1 << 20) as one, http_file(tmp_path / "two", 2 << 20) as two:
        yield one, two


@needs_curl
async def test_two_pipelines_one_through_a_second_peer_reloaded_with_one_changed(tmp_path):
    me = _my_key(tmp_path)
    with _two_files(tmp_path) as ((http_one, digest_one), (http_two, digest_two)):
        async with _echo_server() as echo_port, \
                netchan.Node(listen=["udp://127.0.0.1:0"], allow=[me.node_id]) as inner:
            # the gateway lets us reach both web servers and the inner node's udp port; the inner
            # node only the echo server (its session with us runs inside a tunnel through the gateway)
            inner_port = int(inner.addresses[0].rsplit(":", 1)[1])
            netchan.tunnels.Tunnels.of(inner).allow_exit(f"127.0.0.1:{echo_port}")
            async with netchan.Node(listen=["udp://127.0.0.1:0"], allow=[me.node_id]) as gateway:
                netchan.tunnels.Tunnels.of(gateway).allow_exit(f"127.0.0.1:{http_one}", f"127.0.0.1:{http_two}",
                                                               f"127.0.0.1:{inner_port}")
                config = tmp_path / "node.toml"
                config.write_text(_config("me.key", gateway, inner, f"127.0.0.1:{http_one}",
                                          f"127.0.0.1:{echo_port}"))
                done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "netchan", "run", "--check",
                                                                str(config)], capture_output=True, text=True)
                assert done.returncode == 0 and "good (2 pipelines, 2 peers)" in done.stdout, done.stderr
                async with _netchan("run", str(config), "--log-level", "warning") as run:
                    lines = await _lines_until(run, r"^control socket ")
                    where = _pipelines(lines)
                    assert set(where) == {"direct", "deep"}, lines
                    code, got, _, err = await sha256_of_download([f"http://{where['direct']}/blob"])
                    assert code == 0 and got == digest_one, err
                    # a connection through both peers, held open across the reload
                    reader, writer = await asyncio.open_connection(*where["deep"].rsplit(":", 1))
                    writer.write(b"before the reload")
                    assert await asyncio.wait_for(reader.readexactly(17), 10) == b"before the reload"
                    assert any(p.node_id == me.node_id for p in inner.peers)  # the inner session: end to end

                    config.write_text(_config("me.key", gateway, inner, f"127.0.0.1:{http_two}",
                                              f"127.0.0.1:{echo_port}"))
                    socket = re.search(r"^control socket (\S+)", lines[-1]).group(1)
                    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "netchan", "reload",
                                                                    "--control", socket],
                                                   capture_output=True, text=True, timeout=30)
                    assert done.returncode == 0, done.stderr
                    assert "restarted: direct" in done.stdout and "kept: deep" in done.stdout, done.stdout
                    after = _pipelines(await _lines_until(run, r"^pipeline deep: "))
                    assert after["deep"] == where["deep"]
                    writer.write(b"after the reload")
                    assert await asyncio.wait_for(reader.readexactly(16), 10) == b"after the reload"
                    code, got, _, err = await sha256_of_download([f"http://{after['direct']}/blob"])
                    assert code == 0 and got == digest_two, err
                    writer.close()

                    # SIGHUP reloads too; a file made wrong is refused and the pipelines stay
                    config.write_text(config.read_text().replace('through = ["gateway"]', 'through = ["nobody"]'))
                    run.send_signal(1)
                    code, got, _, err = await sha256_of_download([f"http://{after['direct']}/blob"])
                    assert code == 0 and got == digest_two, err
                    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "netchan", "reload",
                                                                    "--control", socket],
                                                   capture_output=True, text=True, timeout=30)
                    assert done.returncode == 1 and "no peer 'nobody' in [peers]" in done.stderr, done.stderr


def _good(key):
    return f"""identity = "{key}"
listen = ["udp://127.0.0.1:0"]
exit = ["10.0.0.0/8:*"]

[peers.gw]
id = "{netchan.Identity.generate().node_id}"
urls = ["udp://127.0.0.1:7000"]

[[pipeline]]
name = "web"
left = {{ listen = "127.0.0.1:8080" }}
through = ["gw"]
right = {{ connect = "10.0.0.5:80" }}
"""


@pytest.mark.parametrize("change, line, key, reason", [
    (("right = ", "colour = 1\nright = "), 13, "pipeline[0].colour", "unknown key"),
    (('listen = ["udp://127.0.0.1:0"]', 'listen = "udp://127.0.0.1:0"'), 2, "listen", "expected array, got str"),
    (('identity = "KEY"\n', ""), 1, "identity", "missing"),
    (('"10.0.0.0/8:*"', '"10.0.0.0/33:*"'), 3, "exit[0]", "neither an address, a network nor a host name"),
    (('"10.0.0.5:80"', '"10.0.0.5:http"'), 13, "pipeline[0].right.connect", "the port must be a number"),
    (('"gw"]', '"gw", { peer = "gw", carrier = "tcp" }]'), 12, "pipeline[0].through[1].carrier",
     "peer 'gw' has no tcp URL"),
    (("urls = [", "urls = 5 #"), 7, "peers.gw.urls", "expected array, got int"),
    (('name = "web"', 'name = "web'), 10, "", "not TOML"),
    (('exit = ["10.0.0.0/8:*"]\n', 'exit = ["10.0.0.0/8:*"]\n[vpn]\nsubnet = ["10.77.0.0/33"]\n'), 5, "vpn.subnet[0]",
     "is not a network"),
    (('left = { listen = "127.0.0.1:8080" }', 'left = { tun = ["10.1.0.0/16"], device = "x", listen = "1" }'), 11,
     "pipeline[0].left", "not listen and tun"),
    (('left = { listen = "127.0.0.1:8080" }', 'left = { channel = "jobs" }'), 11, "pipeline[0].left.channel",
     "no [[channel]] named 'jobs' here"),
])
def test_a_bad_config_is_one_line_with_file_line_and_key(tmp_path, change, line, key, reason):
    netchan.Identity.generate().save(tmp_path / "node.key")
    path = tmp_path / "node.toml"
    text = _good("KEY").replace(*change).replace("KEY", "node.key")
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        parse_config(text, str(path))
    err = info.value
    assert (err.key, reason in err.reason) == (key, True), err
    if line:
        assert err.line == line, err
    done = subprocess.run([sys.executable, "-m", "netchan", "run", "--check", str(path)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"netchan: {path}:"), done.stderr
    assert reason in done.stderr


def test_a_key_file_others_can_read_is_refused_by_name(tmp_path):
    netchan.Identity.generate().save(tmp_path / "node.key")
    os.chmod(tmp_path / "node.key", 0o644)
    path = tmp_path / "node.toml"
    path.write_text(_good("node.key"))
    done = subprocess.run([sys.executable, "-m", "netchan", "run", "--check", str(path)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2
    assert f"{path}:1: identity: key file" in done.stderr and "chmod 600" in done.stderr, done.stderr


async def _scrape(url):
    from aiohttp import ClientSession

    async with ClientSession() as http:
        async with http.get(url) as response:
            assert response.status == 200
            return await response.text()


def _sample(text, name, **labels):
    """The value of metric ``name`` with ``labels`` in a Prometheus text page (None if absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                return float(value)
    return None


@pytest.mark.parametrize("size", [1, 100_000, 3 << 20])
async def test_metrics_count_what_a_pipeline_moved_while_it_flows(tmp_path, size):
    me = netchan.Identity.generate()
    me.save(tmp_path / "me.key")
    async with _echo_server() as echo_port, \
            netchan.Node(listen=["udp://127.0.0.1:0", "tcp://127.0.0.1:0"], allow=[me.node_id]) as gateway:
        netchan.tunnels.Tunnels.of(gateway).allow_exit(f"127.0.0.1:{echo_port}")
        config = tmp_path / "node.toml"
        config.write_text('identity = "me.key"\nmetrics = "127.0.0.1:0"\n' + _peer("gateway", gateway)
                          + _echo_pipeline("echo", ["gateway"], echo_port))
        async with _netchan("run", str(config), "--log-level", "warning") as run:
            lines = await _lines_until(run, r"^control socket ")
            metrics = _url(lines, "metrics")
            reader, writer = await asyncio.open_connection(*_pipelines(lines)["echo"].rsplit(":", 1))
            data = os.urandom(size)
            writer.write(data)
            assert await asyncio.wait_for(reader.readexactly(size), 30) == data
            # scraped while the connection is open: counted, and the connection with it; the
            # tcp path answers its probes a moment after the session is up on udp

            async def both_paths_up():
                while True:
                    page = await _scrape(metrics)
                    if _sample(page, "netchan_path_up", peer=gateway.node_id, carrier="tcp") == 1:
                        return page
                    await asyncio.sleep(0.05)

            page = await asyncio.wait_for(both_paths_up(), 10)
            assert _sample(page, "netchan_pipeline_sent_bytes_total", pipeline="echo") == size
            assert _sample(page, "netchan_pipeline_received_bytes_total", pipeline="echo") == size
            assert _sample(page, "netchan_pipeline_open_connections", pipeline="echo") == 1
            assert _sample(page, "netchan_peers", state="up") == 1
            for carrier in ("udp", "tcp"):  # both paths of the session, udp carrying it
                assert _sample(page, "netchan_path_up", peer=gateway.node_id, carrier=carrier) == 1
                assert 0 < _sample(page, "netchan_path_rtt_seconds", peer=gateway.node_id, carrier=carrier) < 1
            assert _sample(page, "netchan_path_active", peer=gateway.node_id, carrier="udp") == 1
            # the udp path carried the bytes, QUIC's overhead on top
            sent = _sample(page, "netchan_path_sent_bytes_total", peer=gateway.node_id, carrier="udp")
            received = _sample(page, "netchan_path_received_bytes_total", peer=gateway.node_id, carrier="udp")
            assert size <= sent < size * 1.2 + 40_000 and size <= received < size * 1.2 + 40_000, (sent, received)
            assert _sample(page, "netchan_sessions_total") == 1
            writer.close()


async def test_json_logs_one_line_per_refusal_and_per_session_never_a_secret(tmp_path):
    me, friend = netchan.Identity.generate(), netchan.Identity.generate()
    me.save(tmp_path / "me.key")
    config = tmp_path / "node.toml"
    config.write_text(f'identity = "me.key"\nlisten = ["udp://127.0.0.1:0"]\nallow = ["{friend.node_id}"]\n')
    async with _netchan("run", str(config), "--log-format", "json") as run:
        lines = await _lines_until(run, r"^control socket ")
        url = next(line.split()[2] for line in lines if line.startswith("listening on "))
        async with netchan.Node() as stranger, netchan.Node(friend) as welcome:
            with pytest.raises(netchan.NotAllowed):
                await stranger.connect(url, me.node_id, timeout=5, reconnect=False)
            peer = await welcome.connect(url, me.node_id, timeout=5)
            await peer.aclose()

            seen = []

            async def logged(event, who):
                while True:
                    line = await asyncio.wait_for(run.stderr.readline(), 10)
                    assert line, "stderr ended"
                    seen.append(line.decode())
                    entry = json.loads(line)  # every line is one JSON object
                    if entry.get("event") == event and entry.get("peer") == who:
                        return entry

            refused = await logged("refused", stranger.node_id)
            assert refused["level"] == "WARNING" and refused["reason"] == "not-allowed"
            assert "not in the allow list" in refused["message"]
            up = await logged("peer up", friend.node_id)
            assert up["level"] == "INFO"
    key_text = (tmp_path / "me.key").read_text()
    everything = "".join(seen) + (await run.stderr.read()).decode()
    assert key_text.splitlines()[1] not in everything


needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")


@contextlib.asynccontextmanager
async def _browser():
    """Headless Chromium, driven over its DevTools protocol: yields ``open(url)``,
    which loads a page and returns ``evaluate(expression)``."""
    from aiohttp import ClientSession

    profile = tempfile.mkdtemp(prefix="netchan-chromium-")
    proc = await asyncio.create_subprocess_exec(
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
        f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        while True:
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert line, "chromium ended before it listened"
            if m := re.search(r"DevTools listening on ws://([^/]+)/", line):
                break
        async with ClientSession() as http:
            async with http.get(f"http://{m.group(1)}/json/list") as response:
                target = next(t for t in await response.json() if t["type"] == "page")
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                numbers = iter(range(1, 1 << 30))

                async def call(method, **params):
                    number = next(numbers)
                    await ws.send_json({"id": number, "method": method, "params": params})
                    while True:
                        answer = await asyncio.wait_for(ws.receive_json(), 30)
                        if answer.get("id") == number:
                            assert "error" not in answer, answer
                            return answer["result"]

                async def evaluate(expression):
                    result = await call("Runtime.evaluate", expression=expression, returnByValue=True)
                    return result["result"].get("value")

                async def screenshot(path):
                    result = await call("Page.captureScreenshot", format="png")
                    path.write_bytes(base64.b64decode(result["data"]))

                async def open_page(url):
                    await call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
                               mobile=False)
                    await call("Page.navigate", url=url)
                    evaluate.screenshot = screenshot
                    return evaluate

                yield open_page
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


@needs_chromium
async def test_the_dashboard_in_a_real_browser_shows_both_peers_and_their_paths(tmp_path):
    me = netchan.Identity.generate()
    me.save(tmp_path / "me.key")
    async with _echo_server() as echo_port, \
            netchan.Node(listen=["udp://127.0.0.1:0", "tcp://127.0.0.1:0"], allow=[me.node_id]) as one, \
            netchan.Node(listen=["udp://127.0.0.1:0"], allow=[me.node_id]) as two:
        for node in (one, two):
            netchan.tunnels.Tunnels.of(node).allow_exit(f"127.0.0.1:{echo_port}")
        host, port = one.addresses[0].removeprefix("udp://").rsplit(":", 1)
        chaos = UdpChaos((host, int(port)))  # one's udp path goes through it, to be blackholed
        await chaos.start()
        one_urls = [chaos.url, one.addresses[1]]
        config = tmp_path / "node.toml"
        config.write_text('identity = "me.key"\ndashboard = "127.0.0.1:0"\ndashboard_token = "open-sesame"\n'
                          + _peer("one", one).replace(json.dumps(one.addresses), json.dumps(one_urls))
                          + _peer("two", two) + _echo_pipeline("by-one", ["one"], echo_port)
                          + _echo_pipeline("by-two", ["two"], echo_port))
        async with _netchan("run", str(config), "--log-level", "warning") as run:
            lines = await _lines_until(run, r"^control socket ")
            assert any(line.endswith("(token: dashboard_token)") for line in lines), lines  # not printed
            page = _url(lines, "dashboard") + "?token=open-sesame"
            writers = []
            for address in _pipelines(lines).values():  # a session to each peer, a connection held open
                reader, writer = await asyncio.open_connection(*address.rsplit(":", 1))
                writer.write(b"x" * 100_000)
                await asyncio.wait_for(reader.readexactly(100_000), 10)
                writers.append(writer)
            # token-protected here (a token was set): refused without it
            from aiohttp import ClientSession

            async with ClientSession() as http:
                async with http.get(page.split("?")[0] + "status") as response:
                    assert response.status == 401
            async with _browser() as browser:
                evaluate = await browser(page)

                async def shown():
                    # the page renders what the node says, and draws once a path has two samples
                    while True:
                        dom = await evaluate("document.documentElement.outerHTML")
                        if dom and dom.count("<canvas") >= 2 and 'data-pipeline="by-two"' in dom:
                            return dom
                        await asyncio.sleep(0.2)

                dom = await asyncio.wait_for(shown(), 20)
                # and it keeps updating, by server-sent events
                first = await evaluate("document.getElementById('state').textContent")

                async def updated():
                    while await evaluate("document.getElementById('state').textContent") == first:
                        await asyncio.sleep(0.2)

                await asyncio.wait_for(updated(), 10)
                # a path blackholed: the page shows it down within the failover gap
                chaos.blackhole = True
                row = f'tr[data-path="{chaos.url}"]'

                async def down():
                    while await evaluate(f"document.querySelector('{row}')?.className") != "down":
                        await asyncio.sleep(0.2)

                await asyncio.wait_for(down(), 10)
                artifacts = Path(os.environ.get("NETCHAN_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))
                artifacts.mkdir(exist_ok=True)
                await evaluate.screenshot(artifacts / "dashboard.png")
                assert (artifacts / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            for writer in writers:
                writer.close()
        await chaos.aclose()
    assert f'data-peer="{one.node_id}"' in dom and f'data-peer="{two.node_id}"' in dom, dom[-3000:]
    for url in (*one_urls, two.addresses[0]):
        assert f'data-path="{url}"' in dom, (url, re.findall(r'data-path="[^"]*"', dom))
    assert first.startswith("listening on")
    assert 'data-pipeline="by-one"' in dom and 'data-pipeline="by-two"' in dom


@pytest.mark.parametrize("listen, token", [("127.0.0.1:8787", False), ("[::1]:8787", False),
                                           ("localhost:8787", False), ("0.0.0.0:8787", True),
                                           ("10.1.2.3:8787", True), ("example.org:8787", True)])
def test_the_dashboard_asks_for_a_token_off_loopback(listen, token):
    from netchan.ops.dashboard import needs_token

    assert needs_token(listen) is token


_OTHER_USER = """import os, socket, sys
os.setgid(65534)
os.setuid(65534)
try:
    socket.socket(socket.AF_UNIX).connect(sys.argv[1])
except PermissionError:
    print("refused")
else:
    print("connected")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to try the control socket as another user")
async def test_the_control_socket_refuses_other_users(tmp_path):
    netchan.Identity.generate().save(tmp_path / "me.key")
    (tmp_path / "node.toml").write_text('identity = "me.key"\nlisten = ["udp://127.0.0.1:0"]\n')
    runtime_dir = Path(tempfile.mkdtemp(prefix="nc-run-", dir="/tmp"))  # short: UNIX socket paths are short
    os.chmod(runtime_dir, 0o755)  # others may walk to it: only the socket's own modes stand in the way
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir)}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "netchan", "run", str(tmp_path / "node.toml"),
                                                env=env, stdout=asyncio.subprocess.PIPE)
    try:
        lines = await _lines_until(proc, r"^control socket ")
        path = re.search(r"^control socket (\S+)", lines[-1]).group(1)
        assert path.startswith(str(runtime_dir))
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
        os.chmod(os.path.dirname(path), 0o755)  # even with its directory opened up, the socket refuses
        done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", _OTHER_USER, path],
                                       capture_output=True, text=True, timeout=30)
        assert done.stdout.strip() == "refused", done.stderr
        # its owner gets an answer
        done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "netchan", "status", "--json",
                                                        "--control", path], capture_output=True, text=True,
                                       timeout=30)
        assert done.returncode == 0 and json.loads(done.stdout)["addresses"], done.stderr
    finally:
        await _stop(proc)
        shutil.rmtree(runtime_dir, ignore_errors=True)


def test_a_control_socket_path_too_long_is_one_clear_line(tmp_path):
    netchan.Identity.generate().save(tmp_path / "me.key")
    (tmp_path / "node.toml").write_text(f'identity = "me.key"\ncontrol = "{tmp_path / ("x" * 120)}.sock"\n')
    done = subprocess.run([sys.executable, "-m", "netchan", "run", str(tmp_path / "node.toml")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "too long for a UNIX socket" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("chain", [["sink"], ["gw", "sink"]])
async def test_a_channel_pipeline_carries_every_item_in_order_to_a_peers_channel(tmp_path, chain):
    me, producer = netchan.Identity.generate(), netchan.Identity.generate()
    me.save(tmp_path / "me.key")
    async with netchan.Node(listen=["udp://127.0.0.1:0"], allow=[me.node_id]) as sink, \
            netchan.Node(listen=["udp://127.0.0.1:0"], allow=[me.node_id]) as gw, netchan.Node(producer) as sender:
        done = sink.channel("done", capacity=4)
        netchan.tunnels.Tunnels.of(gw).allow_exit(sink.addresses[0].removeprefix("udp://"))
        config = tmp_path / "node.toml"
        config.write_text(f'identity = "me.key"\nlisten = ["udp://127.0.0.1:0"]\nallow = ["{producer.node_id}"]\n'
                          '[[channel]]\nname = "jobs"\ncapacity = 16\n' + _peer("sink", sink) + _peer("gw", gw)
                          + f'[[pipeline]]\nname = "out"\nleft = {{ channel = "jobs" }}\nthrough = {json.dumps(chain)}\n'
                          'right = { channel = "done" }\n')
        async with _netchan("run", str(config), "--log-level", "warning") as run:
            lines = await _lines_until(run, r"^control socket ")
            url = next(line.split()[2] for line in lines if line.startswith("listening on udp"))
            assert any(line.startswith("pipeline out: channel jobs") for line in lines), lines
            peer = await sender.connect(url, me.node_id, timeout=10)
            jobs = await peer.channel("jobs", direction="send")
            items = [{"job": i, "blob": os.urandom(i % 300)} for i in range(400)]

            async def produce():
                for item in items:
                    await jobs.send(item)

            producing = asyncio.ensure_future(produce())
            got = [await asyncio.wait_for(done.recv(), 20) for _ in items]
            await producing
            assert got == items
            # netchan status: the channel the node owns, and the items that went through it
            socket_path = re.search(r"^control socket (\S+)", lines[-1]).group(1)
            shown = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "netchan", "status", "--control",
                                                             socket_path], capture_output=True, text=True, timeout=30)
            row = next(line for line in shown.stdout.splitlines() if " jobs " in line and "16" in line)
            assert str(len(items)) in row, shown.stdout


@needs_curl
async def test_socks5_pipelines_sharing_a_front_end_choose_by_destination(tmp_path):
    me = _my_key(tmp_path)
    with _two_files(tmp_path) as ((http_one, digest_one), (http_two, digest_two)):
        async with netchan.Node(listen=["udp://127.0.0.1:0"], allow=[me.node_id]) as a, \
                netchan.Node(listen=["udp://127.0.0.1:0"], allow=[me.node_id]) as b:
            netchan.tunnels.Tunnels.of(a).allow_exit(f"127.0.0.1:{http_one}")
            netchan.tunnels.Tunnels.of(b).allow_exit(f"127.0.0.1:{http_two}")
            control = Path(tempfile.mkdtemp(prefix="nc-", dir="/tmp")) / "c.sock"
            config = tmp_path / "node.toml"
            config.write_text(
                f'identity = "me.key"\ncontrol = "{control}"\n' + _peer("a", a) + _peer("b", b)
                + '[[pipeline]]\nname = "to-a"\nleft = { socks5 = "127.0.0.1:0" }\nthrough = ["a"]\n'
                f'match = ["127.0.0.1:{http_one}"]\n'
                + '[[pipeline]]\nname = "rest"\nleft = { socks5 = "127.0.0.1:0" }\nthrough = ["b"]\n')
            try:
                async with _netchan("run", str(config), "--log-level", "warning") as run:
                    lines = await _lines_until(run, r"^control socket ")
                    socks = {m.group(1): m.group(2) for line in lines
                             if (m := re.match(r"pipeline (\S+): socks5 \S+ at (\S+) ->", line))}
                    assert socks["to-a"] == socks["rest"]  # one front end
                    proxy = ["--proxy", f"socks5h://{socks['rest']}"]
                    code, got, _, err = await sha256_of_download([*proxy, f"http://127.0.0.1:{http_one}/blob"])
                    assert code == 0 and got == digest_one, err  # matched: through a
                    code, got, _, err = await sha256_of_download([*proxy, f"http://127.0.0.1:{http_two}/blob"])
                    assert code == 0 and got == digest_two, err  # the rest: through b
                    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "netchan", "status",
                                                                    "--json", "--control", str(control)],
                                                   capture_output=True, text=True, timeout=30)
                    counted = {p["name"]: p for p in json.loads(done.stdout)["pipelines"]}
                    assert counted["to-a"]["opened"] == 1 and counted["to-a"]["bytes_in"] >= 1 << 20
                    assert counted["rest"]["opened"] == 1 and counted["rest"]["bytes_in"] >= 2 << 20
            finally:
                shutil.rmtree(control.parent, ignore_errors=True)


async def test_a_reload_that_cannot_start_a_changed_pipeline_brings_the_previous_one_back(tmp_path):
    _my_key(tmp_path)
    busy = socket.create_server(("127.0.0.1", 0))  # the port the new version asks for, taken
    taken = busy.getsockname()[1]
    try:
        async with _echo_server() as echo_port, netchan.Node(listen=["udp://127.0.0.1:0"], allow=netchan.ANY) as gw:
            netchan.tunnels.Tunnels.of(gw).allow_exit(f"127.0.0.1:{echo_port}")
            control = Path(tempfile.mkdtemp(prefix="nc-", dir="/tmp")) / "c.sock"
            config = tmp_path / "node.toml"
            text = f'identity = "me.key"\ncontrol = "{control}"\n' + _peer("gw", gw) + _echo_pipeline("echo", ["gw"],
                                                                                                     echo_port)
            config.write_text(text)
            try:
                async with _netchan("run", str(config), "--log-level", "error") as run:
                    where = _pipelines(await _lines_until(run, r"^control socket "))["echo"]
                    config.write_text(text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{taken}"'))
                    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "netchan", "reload",
                                                                    "--control", str(control)],
                                                   capture_output=True, text=True, timeout=30)
                    assert done.returncode == 1, done.stdout
                    assert f"cannot listen on 127.0.0.1:{taken}" in done.stderr, done.stderr
                    assert "the previous configuration runs again" in done.stderr
                    back = _pipelines(await _lines_until(run, r"^pipeline echo: "))["echo"]
                    reader, writer = await asyncio.open_connection(*back.rsplit(":", 1))
                    writer.write(b"still echoing")
                    assert await asyncio.wait_for(reader.readexactly(13), 10) == b"still echoing"
                    writer.close()
                    assert where  # (port 0: the pipeline came back on a port of its own)
            finally:
                shutil.rmtree(control.parent, ignore_errors=True)
    finally:
        busy.close()


def test_errors_point_at_their_line_past_brackets_in_strings_and_in_sub_tables():
    text = '''identity = "me.key"
exit = ["10.0.0.0/8:*"]   # [ a comment that opens a bracket
[peers.gw]
id = "x[y"
urls = 5
[[pipeline]]
name = "a"
left = { listen = "1" }
through = ["gw"]
right = { connect = "h:1" }
[[pipeline]]
name = "b"
through = ["gw"]
[pipeline.left]
listen = "127.0.0.1:1"
colour = "red"
'''
    with pytest.raises(ConfigError) as info:
        parse_config(text, "node.toml")
    assert (info.value.key, info.value.line) == ("peers.gw.urls", 5), info.value
    with pytest.raises(ConfigError) as info:
        parse_config(text.replace("urls = 5", 'urls = ["udp://127.0.0.1:1"]'), "node.toml")
    assert (info.value.key, info.value.line) == ("pipeline[1].left.colour", 16), info.value
