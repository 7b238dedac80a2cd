"""``netchan run CONFIG``: pipelines from a config file, used by curl,
reloaded without disturbing what did not change; bad configs refused with
the file, line and key; the metrics endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys

import pytest

import netchan
from netchan.ops.config import ConfigError, parse_config

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


def _pipelines(lines):
    """pipeline name -> the address it listens on, from netchan run's lines."""
    found = {}
    for line in lines:
        m = re.match(r"pipeline (\S+): listen \S+ at (\S+) ->", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


@needs_curl
async def test_two_pipelines_one_through_a_second_peer_reloaded_with_one_changed(tmp_path):
    me = netchan.Identity.generate()
    me.save(tmp_path / "me.key")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    with http_file(tmp_path / "one", 1 << 20) as (http_one, digest_one), \
            http_file(tmp_path / "two", 2 << 20) as (http_two, digest_two):
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
        config.write_text(f"""identity = "me.key"
metrics = "127.0.0.1:0"
[peers.gateway]
id = "{gateway.node_id}"
urls = ["{gateway.addresses[0]}", "{gateway.addresses[1]}"]
[[pipeline]]
name = "echo"
left = {{ listen = "127.0.0.1:0" }}
through = ["gateway"]
right = {{ connect = "127.0.0.1:{echo_port}" }}
""")
        async with _netchan("run", str(config), "--log-level", "warning") as run:
            lines = await _lines_until(run, r"^control socket ")
            metrics = next(re.search(r"(http://\S+)", line).group(1) for line in lines if line.startswith("metrics"))
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
