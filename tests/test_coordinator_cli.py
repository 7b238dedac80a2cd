"""``netchan coordinator``, ``invite``, ``join``, ``serve --member``,
``ping --member``, ``revoke`` and ``members``, as separate processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import subprocess
import sys

import pytest

import netchan

from .test_tunnel_cli import _lines_until, _stop

pytestmark = pytest.mark.async_timeout(90)


def netchan_cmd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netchan", *args], capture_output=True, text=True, timeout=timeout)


@contextlib.asynccontextmanager
async def started(*args: str):
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "netchan", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        yield proc
    finally:
        await _stop(proc)


async def test_a_coordinator_invites_members_that_then_reach_each_other_by_name(tmp_path):
    keys = {}
    for who in ("coord", "alice", "bob"):
        ident = netchan.Identity.generate()
        keys[who] = str(tmp_path / f"{who}.key")
        ident.save(keys[who])
    state = str(tmp_path / "state")
    async with started("coordinator", "--identity", keys["coord"], "--listen", "udp://127.0.0.1:0",
                       "--state", state) as coord:
        await _lines_until(coord, r"^listening on udp://")
        invitations = {}
        for who in ("alice", "bob"):
            done = await asyncio.to_thread(netchan_cmd, "invite", "--state", state, "--name", who)
            assert done.returncode == 0, done.stderr
            invitations[who] = done.stdout.strip()
            assert invitations[who].startswith("netchan-invite:")
        done = await asyncio.to_thread(netchan_cmd, "join", invitations["alice"], "--identity", keys["alice"])
        assert done.returncode == 0, done.stderr
        assert "as alice" in done.stdout
        assert stat.S_IMODE(os.stat(keys["alice"] + ".member").st_mode) == 0o600
        # the invitation is spent
        done = await asyncio.to_thread(netchan_cmd, "join", invitations["alice"], "--identity", keys["bob"])
        assert done.returncode == 1 and "unknown, used up or expired" in done.stderr
        done = await asyncio.to_thread(netchan_cmd, "join", invitations["bob"], "--identity", keys["bob"])
        assert done.returncode == 0, done.stderr
        async with started("serve", "--identity", keys["bob"], "--listen", "udp://127.0.0.1:0",
                           "--member") as bob:
            await _lines_until(bob, r"^member bob of coordinator ")
            done = await asyncio.to_thread(netchan_cmd, "ping", "--member", "--peer", "bob",
                                           "--identity", keys["alice"], "-c", "2", "-i", "0.1")
            assert done.returncode == 0, done.stderr
            assert done.stdout.count("reply from") == 2
        listed = await asyncio.to_thread(netchan_cmd, "members", "--state", state)
        assert listed.returncode == 0 and "alice" in listed.stdout and "bob" in listed.stdout
        done = await asyncio.to_thread(netchan_cmd, "revoke", "--state", state, "bob")
        assert done.returncode == 0 and "revoked bob" in done.stdout
        listed = await asyncio.to_thread(netchan_cmd, "members", "--state", state)
        assert any(line.startswith("bob") and "revoked" in line for line in listed.stdout.splitlines())


@pytest.mark.parametrize("args, message", [
    (["join", "netchan-invite:garbage!", "--identity", "KEY"], "this invitation is damaged"),
    (["join", "not an invitation", "--identity", "KEY"], "not a netchan invitation"),
    (["invite", "--state", "EMPTY"], "no coordinator (start netchan coordinator first)"),
    (["invite", "--state", "EMPTY", "--expires", "soon"], "not a duration"),
    (["ping", "--member", "--peer", "bob", "--identity", "KEY"], "run netchan join first"),
])
def test_bad_input_gets_a_one_line_reason(tmp_path, args, message):
    key = tmp_path / "key"
    netchan.Identity.generate().save(key)
    (tmp_path / "empty").mkdir()
    args = [str(key) if a == "KEY" else str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    done = netchan_cmd(*args)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
