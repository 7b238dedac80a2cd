"""The netchan command: serve and ping, as separate processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import netchan


def _serve(tmp_path, server, client, *listen):
    args = [sys.executable, "-m", "netchan", "serve", "--identity", str(tmp_path / "server.key"),
            "--allow", client.node_id]
    for url in listen:
        args += ["--listen", url]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline().strip() for _ in range(1 + len(listen))]
    assert lines[0] == f"node {server.node_id}", lines
    urls = [line.removeprefix("listening on ") for line in lines[1:]]
    return proc, urls


def _ping(tmp_path, url, server, identity="client.key", count=3):
    urls = [url] if isinstance(url, str) else url
    return subprocess.run(
        [sys.executable, "-m", "netchan", "ping", *urls, "--peer", server.node_id,
         "--identity", str(tmp_path / identity), "-c", str(count), "-I", "0.05"],
        capture_output=True, text=True, timeout=60,
    )


def test_serve_and_ping_over_udp_and_tcp(keys):
    tmp_path, server, client = keys
    proc, urls = _serve(tmp_path, server, client, "udp://127.0.0.1:0", "tcp://127.0.0.1:0")
    try:
        for url in urls:
            result = _ping(tmp_path, url, server)
            assert result.returncode == 0, result.stderr
            replies = re.findall(r"seq=(\d+) time=([\d.]+) ms", result.stdout)
            assert [int(s) for s, _ in replies] == [1, 2, 3]
            assert all(float(t) > 0 for _, t in replies)
            assert "3/3 replies" in result.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0


def test_ping_over_several_paths_shows_each_one(keys):
    tmp_path, server, client = keys
    proc, urls = _serve(tmp_path, server, client, "udp://127.0.0.1:0", "tcp://127.0.0.1:0")
    try:
        result = _ping(tmp_path, urls, server, count=12)
        assert result.returncode == 0, result.stderr
        assert "12/12 replies" in result.stdout
        summary = result.stdout.split("--- paths", 1)[1]
        rows = re.findall(r"path (\S+)\s+(\w+)\s+rtt=([\d.]+) ms.*?( active)?$", summary, re.M)
        assert [r[0] for r in rows] == urls
        assert all(state == "up" and float(rtt) > 0 for _, state, rtt, _ in rows)
        assert [bool(active) for *_, active in rows] == [True, False]  # failover: the first
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_ping_with_an_unknown_key_is_refused(keys):
    tmp_path, server, client = keys
    netchan.Identity.generate().save(tmp_path / "stranger.key")
    proc, urls = _serve(tmp_path, server, client, "udp://127.0.0.1:0")
    try:
        result = _ping(tmp_path, urls[0], server, identity="stranger.key")
        assert result.returncode != 0
        assert "NotAllowed" in result.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_ping_the_wrong_node_id_is_refused(keys):
    tmp_path, server, client = keys
    proc, urls = _serve(tmp_path, server, client, "tcp://127.0.0.1:0")
    try:
        impostor = netchan.Identity.generate()
        result = _ping(tmp_path, urls[0], impostor)
        assert result.returncode != 0
        assert "AuthenticationError" in result.stderr and "mismatch" in result.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_demo_runs_and_verifies(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "netchan", "demo", "--streams", "--seconds", "2.5", "--cut-every", "0.5"],
        capture_output=True, text=True, timeout=120, env={**os.environ},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verified" in result.stdout
    cuts = int(re.search(r"cuts survived\s+(\d+)", result.stdout.split("\n\n")[-1]).group(1))
    assert cuts >= 3


def test_work_queue_demo_loses_nothing():
    result = subprocess.run(
        [sys.executable, "-m", "netchan", "demo", "--jobs", "300", "--cut-every", "0.5"],
        capture_output=True, text=True, timeout=120, env={**os.environ},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "jobs lost          0" in result.stdout
    assert "OK: nothing lost" in result.stdout


@pytest.mark.parametrize("environment, kept", [({}, True), ({"MALLOC_ARENA_MAX": "2"}, False)])
def test_commands_keep_freed_heap_unless_the_environment_tunes_malloc(environment, kept):
    """Bulk tunnels free and allocate 60-256 KB buffers all the time: the CLI has
    glibc keep freed heap (no page faults for every new buffer), and leaves
    malloc alone when the user set MALLOC_* themselves."""
    import platform

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("keeping the heap is a glibc setting")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(environment)
    out = subprocess.run([sys.executable, "-c", "from netchan.cli.runner import keep_heap; print(keep_heap())"],
                         capture_output=True, text=True, env=env, timeout=60, check=True)
    assert out.stdout.strip() == str(kept)
