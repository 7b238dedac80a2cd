"""``netchan coordinator``, ``invite``, ``join``, ``serve --member``,
``ping --member``, ``revoke`` and ``members``, as separate processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import subprocess
import sys

import pytest

import netchan

from .helpers import echo_connection
from .test_tunnel_cli import _lines_until, _stop

pytestmark = pytest.mark.async_timeout(90)


async def _closed(server):
    server.close()
    await server.wait_closed()


def netchan_cmd(*args: str, timeout: float = 30, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netchan", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@contextlib.asynccontextmanager
async def started(*args: str, env: dict[str, str] | None = None):
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "netchan", *args, env=env,
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
    controls = {who: str(tmp_path / f"{who}.sock") for who in ("coord", "bob")}
    bob_id = netchan.Identity.load(keys["bob"]).node_id
    async with contextlib.AsyncExitStack() as stack, started("coordinator", "--identity", keys["coord"], "--listen", "udp://127.0.0.1:0",
                       "--state", state, "--control", controls["coord"]) as coord:
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
        echo_server = await asyncio.start_server(echo_connection, "127.0.0.1", 0)
        stack.push_async_callback(_closed, echo_server)
        echo_port = echo_server.sockets[0].getsockname()[1]
        async with started("serve", "--identity", keys["bob"], "--listen", "udp://127.0.0.1:0",
                           "--member", "--control", controls["bob"], "--exit", f"127.0.0.1:{echo_port}") as bob:
            await _lines_until(bob, r"^member bob of coordinator ")
            await _lines_until(bob, r"^control socket ")
            done = await asyncio.to_thread(netchan_cmd, "ping", "--member", "--peer", "bob",
                                           "--identity", keys["alice"], "-c", "2", "-I", "0.1")
            assert done.returncode == 0, done.stderr
            assert done.stdout.count("reply from") == 2
            # a tunnel to bob by name: -L through the session the coordinator brought about
            alice_control = str(tmp_path / "alice.sock")
            async with started("tunnel", "--member", "--peer", "bob", "--identity", keys["alice"],
                               "-L", f"0:127.0.0.1:{echo_port}", "--control", alice_control) as tunnel:
                lines = await _lines_until(tunnel, r"^-L listening on ")
                port = int(lines[-1].split()[3].rsplit(":", 1)[1])
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"hello bob")
                assert await asyncio.wait_for(reader.readexactly(9), 10) == b"hello bob"
                writer.close()
                # alice's status: bob, with its direct path and the relay
                await _lines_until(tunnel, r"^control socket ")
                done = await asyncio.to_thread(netchan_cmd, "status", "--control", alice_control, "--json")
                assert done.returncode == 0, done.stderr
                peers = {p["node_id"]: p for p in json.loads(done.stdout)["peers"]}
                carriers = [path["carrier"] for path in peers[bob_id]["paths"]]
                assert carriers == ["udp", "relay"], peers[bob_id]
            # netchan status: the coordinator's directory, bob's peers and paths
            assert stat.S_IMODE(os.stat(controls["coord"]).st_mode) == 0o600
            done = await asyncio.to_thread(netchan_cmd, "status", "--control", controls["coord"], "--json")
            assert done.returncode == 0, done.stderr
            said = json.loads(done.stdout)
            directory = said["coordinator"]
            assert {m["name"] for m in directory["members"]} == {"alice", "bob"}
            assert bob_id in directory["online"] and directory["relayed_bytes"] > 0
            done = await asyncio.to_thread(netchan_cmd, "status", "--control", controls["bob"], "--json")
            peers = {p["node_id"]: p for p in json.loads(done.stdout)["peers"]}
            assert said["node_id"] in peers  # the coordinator, over one udp path
            table = await asyncio.to_thread(netchan_cmd, "status", "--control", controls["coord"])
            assert table.returncode == 0 and "directory: 2 members" in table.stdout, table.stderr
        listed = await asyncio.to_thread(netchan_cmd, "members", "--state", state)
        assert listed.returncode == 0 and "alice" in listed.stdout and "bob" in listed.stdout
        done = await asyncio.to_thread(netchan_cmd, "revoke", "--state", state, "bob")
        assert done.returncode == 0 and "revoked bob" in done.stdout
        listed = await asyncio.to_thread(netchan_cmd, "members", "--state", state)
        assert any(line.startswith("bob") and "revoked" in line for line in listed.stdout.splitlines())


async def test_a_coordinator_without_options_keeps_its_key_and_directory_in_the_state_home(tmp_path):
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state-home")}
    state = tmp_path / "state-home" / "netchan" / "coordinator"
    ids = []
    for run in range(2):
        async with started("coordinator", "--listen", "udp://127.0.0.1:0", env=env) as coord:
            lines = await _lines_until(coord, r"^coordinator ")
            ids.append(lines[-1].split()[1])
            lines += await _lines_until(coord, r"^listening on udp://")
            if run == 0:
                assert any(line == f"new key {state / 'coordinator.key'}" for line in lines), lines
                # invite finds the running coordinator in the same default directory
                done = await asyncio.to_thread(netchan_cmd, "invite", "--name", "alice", env=env)
                assert done.returncode == 0, done.stderr
                invitation = netchan.coordinator.Invitation.decode(done.stdout.strip())
            else:
                # the invitation made before the restart is good at the coordinator that came back
                # (at its new port: port 0 here)
                url = lines[-1].split()[2]
                again = netchan.coordinator.Invitation(invitation.coordinator, [url], invitation.id, invitation.secret)
                key = tmp_path / "alice.key"
                netchan.Identity.generate().save(key)
                done = await asyncio.to_thread(netchan_cmd, "join", again.encode(), "--identity", str(key), env=env)
                assert done.returncode == 0, done.stderr
    assert ids[0] == ids[1] == invitation.coordinator
    assert stat.S_IMODE(os.stat(state / "coordinator.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700


@pytest.mark.parametrize("args, message", [
    (["join", "netchan-invite:garbage!", "--identity", "KEY"], "this invitation is damaged"),
    (["join", "not an invitation", "--identity", "KEY"], "not a netchan invitation"),
    (["invite", "--state", "EMPTY"], "no coordinator (start netchan coordinator first)"),
    (["invite", "--state", "EMPTY", "--expires", "soon"], "not a duration"),
    (["ping", "--member", "--peer", "bob", "--identity", "KEY"], "run netchan join first"),
    (["status", "--control", "EMPTY/none.sock"], "cannot reach the node"),
])
def test_bad_input_gets_a_one_line_reason(tmp_path, args, message):
    key = tmp_path / "key"
    netchan.Identity.generate().save(key)
    (tmp_path / "empty").mkdir()
    args = [str(key) if a == "KEY" else a.replace("EMPTY", str(tmp_path / "empty")) for a in args]
    done = netchan_cmd(*args)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
