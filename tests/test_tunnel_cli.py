"""``netchan serve --exit`` and ``netchan tunnel -L -R -D``, as separate
processes, with curl as the application."""

from __future__ import annotations

import asyncio
import re
import signal
import sys

import pytest

import netchan
from netchan.cli.tunnel import parse_forward, parse_socks

from .test_tunnels import curl, echo_all, hostport_of, http_file, needs_curl, sha256_of_download, udp_echo


@pytest.mark.parametrize("spec, listen, target", [
    ("8080:localhost:80", "127.0.0.1:8080", "localhost:80"),
    ("0.0.0.0:8080:10.0.0.1:22", "0.0.0.0:8080", "10.0.0.1:22"),
    ("*:8080:10.0.0.1:22", "0.0.0.0:8080", "10.0.0.1:22"),
    ("[::1]:8080:[fd00::1]:22", "[::1]:8080", "[fd00::1]:22"),
    ("8080:[::1]:22", "127.0.0.1:8080", "[::1]:22"),
])
def test_forward_specs_read_like_ssh(spec, listen, target):
    assert parse_forward(spec) == (listen, target, "tcp")
    assert parse_forward(spec + "/udp") == (listen, target, "udp")


@pytest.mark.parametrize("bad", ["8080", "8080:host", "a:b:c:d:e", "8080::80"])
def test_a_bad_forward_spec_is_refused(bad):
    with pytest.raises(netchan.ConfigurationError):
        parse_forward(bad)


def test_socks_specs():
    assert parse_socks("1080") == ("127.0.0.1:1080", {})
    assert parse_socks("alice:pw:x@0.0.0.0:1080") == ("0.0.0.0:1080", {"alice": "pw:x"})


async def _lines_until(proc, pattern, n_max=20, timeout=20):
    seen = []
    for _ in range(n_max):
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode()
        if not line:
            break
        seen.append(line.rstrip())
        if re.search(pattern, line):
            return seen
    raise AssertionError(f"no line like {pattern!r} in {seen}")


async def _stop(proc):
    if proc.returncode is None:
        proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
    return proc.returncode


@needs_curl
@pytest.mark.async_timeout(90)
async def test_serve_and_tunnel_commands_forward_both_ways_and_proxy(tmp_path):
    server, client = netchan.Identity.generate(), netchan.Identity.generate()
    server.save(tmp_path / "server.key")
    client.save(tmp_path / "client.key")
    async with udp_echo() as udp_port:
        await _serve_and_tunnel(tmp_path, server, client, udp_port)


async def _serve_and_tunnel(tmp_path, server, client, udp_port):
    with http_file(tmp_path, 8 << 20) as (http_port, digest):
        serve = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "netchan", "serve", "--identity", str(tmp_path / "server.key"),
            "--listen", "udp://127.0.0.1:0", "--allow", client.node_id, "--exit", f"127.0.0.1:{http_port}",
            "--exit", f"127.0.0.1:{udp_port}",
            "--allow-remote-bind", "127.0.0.1:0", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        tunnel = None
        try:
            lines = await _lines_until(serve, r"^peers may listen")
            url = next(line.removeprefix("listening on ") for line in lines if line.startswith("listening on "))
            tunnel = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "netchan", "tunnel", url, "--peer", server.node_id,
                "--identity", str(tmp_path / "client.key"),
                "-L", f"0:127.0.0.1:{http_port}", "-R", f"0:127.0.0.1:{http_port}",
                "-L", f"0:127.0.0.1:{udp_port}/udp", "-R", f"0:127.0.0.1:{udp_port}/udp", "-D", "u:p@0",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            lines = await _lines_until(tunnel, r"^-D SOCKS5")
            text = "\n".join(lines)
            local = re.search(r"-L listening on (\S+) ->", text).group(1)
            remote = re.search(r"-R the peer listens on (\S+) ->", text).group(1)
            socks = re.search(r"-D SOCKS5 on (\S+)", text).group(1)
            for where in (re.search(r"-L listening on (\S+)/udp", text).group(1),
                          re.search(r"-R the peer listens on (\S+)/udp", text).group(1)):
                back, _ = await echo_all(hostport_of(where), [b"datagram %d" % i for i in range(100)])
                assert back == {i: b"datagram %d" % i for i in range(100)}
            for target in (local, remote):
                code, got, size, err = await sha256_of_download([f"http://{target}/blob"])
                assert code == 0 and got == digest, err
            code, got, size, err = await sha256_of_download(
                ["--proxy", f"socks5h://u:p@{socks}", f"http://127.0.0.1:{http_port}/blob"])
            assert code == 0 and got == digest, err
            code, _, err = await curl("--proxy", f"socks5h://u:wrong@{socks}", f"http://127.0.0.1:{http_port}/")
            assert code != 0
            assert await _stop(tunnel) == 0  # Ctrl-C ends it cleanly
            out = (await tunnel.stdout.read()).decode()
            assert "stopped" in out
        finally:
            if tunnel is not None:
                await _stop(tunnel)
            await _stop(serve)


@pytest.mark.async_timeout(30)
async def test_tunnel_with_nothing_to_do_or_a_bad_spec_says_so():
    for extra, message in (([], "nothing to do"), (["-L", "8080"], "write [BIND:]PORT"),
                           (["-R", "0:127.0.0.1/udp"], "write [BIND:]PORT")):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "netchan", "tunnel", "udp://127.0.0.1:9", "--peer", "x" * 32, *extra,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 2 and message in err.decode(), err


@pytest.mark.async_timeout(30)
async def test_off_a_terminal_the_status_is_a_log_line_per_forward_when_something_changed(capsys):
    from netchan.cli.tunnel import _log_lines
    from netchan.tunnels.pump import Counters

    class FakeForward:
        address = ("127.0.0.1", 8080)
        target = "127.0.0.1:80"
        counters = Counters()

    class FakePeer:
        state = "up"
        path = "udp://127.0.0.1:7000"

    fwd = FakeForward()
    stop = asyncio.Event()
    task = asyncio.ensure_future(_log_lines(FakePeer(), [("-L", fwd)], stop, every=0.01))
    try:
        fwd.counters.opened, fwd.counters.bytes_out = 3, 2_500_000
        while "total 3" not in capsys.readouterr().out:
            await asyncio.sleep(0.01)
        fwd.counters.open = 1
        out = ""
        while "open 1" not in out:
            await asyncio.sleep(0.01)
            out += capsys.readouterr().out
        assert "-L 127.0.0.1:8080 -> 127.0.0.1:80" in out and "out 2.5 MB" in out and "via udp://" in out
        await asyncio.sleep(0.05)
        assert capsys.readouterr().out == ""  # nothing changed: nothing printed
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
