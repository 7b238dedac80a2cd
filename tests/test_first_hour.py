"""A newcomer's first hour: every message of the command line says what
happened (as processes, the way a user runs them)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

import netchan

NETCHAN = [sys.executable, "-m", "netchan"]


class _Serve:
    """``netchan serve`` in the background: its URL, its stderr once stopped."""

    def __init__(self, tmp_path, *options, engine=None):
        args = [*NETCHAN, "serve", "-i", str(tmp_path / "server.key"), "--listen", "udp://127.0.0.1:0", *options]
        if engine:
            args += ["--engine", engine]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.proc.stdout.readline()  # node ID
        self.url = self.proc.stdout.readline().strip().removeprefix("listening on ")
        assert self.url.startswith("udp://"), self.url

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


@pytest.fixture
def serving(keys):
    started = []

    def start(*options, engine=None):
        s = _Serve(keys[0], *options, engine=engine)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def _netchan(*args, timeout=30):
    started = time.monotonic()
    done = subprocess.run([*NETCHAN, *args], capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


def test_version():
    done, _ = _netchan("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"netchan {netchan.__version__}"


def test_help_is_plain_and_every_ping_option_is_explained():
    done, _ = _netchan("--help")
    assert "``" not in done.stdout and "Network channels and tunnels" in done.stdout
    done, _ = _netchan("ping", "--help")
    assert "-i PATH, --identity PATH" in done.stdout and "-I INTERVAL, --interval INTERVAL" in done.stdout
    assert "how long to wait for the session and for each reply" in done.stdout


def test_an_engine_mismatch_is_named(keys, serving):
    tmp_path, server, client = keys
    s = serving("--allow", client.node_id, engine="qh3")
    done, took = _netchan("ping", s.url, "--peer", server.node_id, "-i", str(tmp_path / "client.key"),
                          "--engine", "aioquic", "--timeout", "2")
    assert done.returncode == 1 and "same QUIC engine" in done.stderr and "aioquic" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    err = s.stop()
    assert "the other QUIC engine" in err and "this node runs qh3" in err, err


@pytest.mark.parametrize("command", [["ping", "udp://nohost", "--peer", "a" * 32], ["serve", "--listen", "udp://nohost"],
                                     ["ping", "tcp://127.0.0.1", "--peer", "a" * 32]])
def test_a_missing_port_is_one_error_naming_the_url(command):
    done, _ = _netchan(*command)
    url = command[1] if command[0] == "ping" else command[2]
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and line.startswith(f"netchan: ConfigurationError: {url}: a port is needed"), line
    assert line.count(url + ": ") == 1 and "BrokenError" not in done.stderr, line  # said once, the right class


def test_a_listen_host_that_does_not_resolve_names_the_url():
    done, _ = _netchan("serve", "--listen", "udp://nohost.invalid:7000", "--allow", "any")
    assert done.returncode != 0 and "cannot listen on udp://nohost.invalid:7000" in done.stderr, done.stderr


def test_a_refused_tcp_connection_is_reported_at_once(keys):
    tmp_path, server, _client = keys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    done, took = _netchan("ping", f"tcp://127.0.0.1:{port}", "--peer", server.node_id, "--timeout", "5")
    assert done.returncode == 1 and "Connection refused" in done.stderr, done.stderr
    assert took < 2.5, f"{took:.2f} s (the process's own start included)"


def test_ping_ends_on_sigterm_with_its_summary(keys, serving):
    tmp_path, server, client = keys
    s = serving("--allow", client.node_id)
    ping = subprocess.Popen([*NETCHAN, "ping", s.url, "--peer", server.node_id, "-i", str(tmp_path / "client.key"),
                             "-c", "0", "-I", "0.05"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        replies = [ping.stdout.readline() for _ in range(4)]  # the PING line and three replies first
        assert all("reply from" in r for r in replies[1:]), replies
        ping.send_signal(signal.SIGTERM)
        out, err = ping.communicate(timeout=10)
    finally:
        if ping.poll() is None:
            ping.kill()
    assert ping.returncode == 0, err
    assert "replies, rtt min/median/max" in out, out


def test_serve_warns_when_it_admits_no_one_and_logs_sessions_and_refusals(keys, serving):
    tmp_path, server, client = keys
    lonely = serving()
    stranger = netchan.Identity.generate()
    stranger.save(tmp_path / "stranger.key")
    done, _ = _netchan("ping", lonely.url, "--peer", server.node_id, "-i", str(tmp_path / "stranger.key"), "-c", "1")
    assert done.returncode == 1 and "NotAllowed" in done.stderr
    err = lonely.stop()
    assert "this node admits no one" in err
    assert f"refused node {stranger.node_id}: not in the allow list" in err, err
    s = serving("--allow", client.node_id)
    done, _ = _netchan("ping", s.url, "--peer", server.node_id, "-i", str(tmp_path / "client.key"), "-c", "1")
    assert done.returncode == 0, done.stderr
    err = s.stop()
    assert f"peer up {client.node_id}" in err and f"peer down {client.node_id}" in err, err
    assert "admits no one" not in err and "('peer_closed'" not in err


def test_an_allow_file_is_read_as_authorized_keys_and_a_bad_line_is_named(keys, serving):
    tmp_path, server, client = keys
    allowed = tmp_path / "allowed"
    allowed.write_text(f"# who may connect\n\n{client.node_id} laptop of alice\n{'b' * 32}  # the backup box\n")
    s = serving("--allow-file", str(allowed))
    done, _ = _netchan("ping", s.url, "--peer", server.node_id, "-i", str(tmp_path / "client.key"), "-c", "1")
    assert done.returncode == 0, done.stderr
    assert "admits no one" not in s.stop()
    allowed.write_text(f"{client.node_id} alice\nnot-a-node-id bob\n")
    done, _ = _netchan("serve", "--listen", "udp://127.0.0.1:0", "--allow-file", str(allowed))
    assert done.returncode != 0 and f"{allowed}:2: not a node id: 'not-a-node-id'" in done.stderr, done.stderr


def test_the_demo_with_one_worker_replaces_it_and_completes():
    done, _ = _netchan("demo", "--workers", "1", "--jobs", "200", timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "OK: nothing lost" in done.stdout and "worker 0 killed at" in done.stdout
    assert "\r" not in done.stdout  # not a terminal: a line a second, no redraws
    done, _ = _netchan("demo", "--workers", "0")
    assert done.returncode != 0 and "at least one worker" in done.stderr
