"""``netchan tunnel -L`` beside ``ssh -L`` and a plain relay, on loopback.

Every tunnel is a pair of processes started here: ``netchan serve --exit``
and ``netchan tunnel -L`` (over the tcp and the udp carrier); ``sshd`` (a
throwaway host key, on a loopback port) and ``ssh -N -L`` with each cipher;
``socat`` as a plain unencrypted relay.  Through each, a client here uploads
``size`` bytes to a sink and downloads ``size`` bytes from a source (both a
plain blocking-socket process), one direction at a time.  Reported: MB/s,
the CPU seconds per GB of the tunnel's processes (both ends, children
included), and the set-up time of a new forwarded connection (connect to
first byte).  Medians of ``runs``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import psutil

MiB = 1 << 20

ENDPOINTS = r"""
import socket, sys
role = sys.argv[1]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(64)
print(srv.getsockname()[1], flush=True)
buf = bytearray(1 << 20)
block = bytes(range(256)) * 4096
while True:
    conn, _ = srv.accept()
    if role == "sink":  # read to the end, then answer how much
        n = 0
        while (k := conn.recv_into(buf)):
            n += k
        conn.sendall(str(n).encode())
    else:  # source: the first line says how many bytes to send
        line = b""
        while not line.endswith(b"\n"):
            more = conn.recv(64)
            if not more:
                break
            line += more
        n = int(line) if line.endswith(b"\n") else 0
        view = memoryview(block)
        while n > 0:
            k = conn.send(view[: min(n, len(view))])
            n -= k
    conn.close()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            for q in [p, *p.children(recursive=True)]:
                t = q.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class Tunnel:
    """Processes that forward a local port to a target port."""

    #: whether the CPU time of its processes can be read (socat's per-connection
    #: children are gone before they can be)
    counts_cpu = True

    def __init__(self, label: str) -> None:
        self.label = label
        self.procs: list[subprocess.Popen] = []

    def start(self, sink: int, source: int) -> tuple[int, int]:
        raise NotImplementedError

    def popen(self, args: list[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, **kw)
        self.procs.append(proc)
        return proc

    @property
    def cpu(self) -> float:
        return _cpu([psutil.Process(p.pid) for p in self.procs if p.poll() is None])

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Netchan(Tunnel):
    def __init__(self, carrier: str, tmp: str) -> None:
        super().__init__(f"netchan tunnel -L, {carrier} carrier")
        self.carrier, self.tmp = carrier, tmp

    def start(self, sink: int, source: int) -> tuple[int, int]:
        py = [sys.executable, "-m", "netchan"]
        keys = {}
        for name in ("server", "client"):
            keys[name] = os.path.join(self.tmp, f"{name}.key")
            out = subprocess.run([*py, "keygen", "-o", keys[name], "--force"], capture_output=True, text=True,
                                 check=True)
            keys[name + "_id"] = out.stdout.strip()
        server = self.popen([*py, "serve", "--identity", keys["server"], "--listen", f"{self.carrier}://127.0.0.1:0",
                             "--allow", keys["client_id"], "--exit", f"127.0.0.1:{sink}",
                             "--exit", f"127.0.0.1:{source}"], stdout=subprocess.PIPE, text=True)
        url = ""
        while not url:
            line = server.stdout.readline()
            if not line:
                raise RuntimeError("netchan serve did not start")
            if line.startswith("listening on "):
                url = line.split()[-1]
        a, b = _free_port(), _free_port()
        self.popen([*py, "tunnel", url, "--peer", keys["server_id"], "--identity", keys["client"],
                    "-L", f"{a}:127.0.0.1:{sink}", "-L", f"{b}:127.0.0.1:{source}"], stdout=subprocess.DEVNULL)
        _wait_port(a)
        _wait_port(b)
        return a, b


class Ssh(Tunnel):
    def __init__(self, cipher: str, tmp: str) -> None:
        super().__init__(f"ssh -L, {cipher}")
        self.cipher, self.tmp = cipher, tmp

    def start(self, sink: int, source: int) -> tuple[int, int]:
        d = self.tmp
        for name in ("host", "client"):
            path = os.path.join(d, f"{name}_key")
            if not os.path.exists(path):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)
        shutil.copy(os.path.join(d, "client_key.pub"), os.path.join(d, "authorized_keys"))
        port = _free_port()
        config = os.path.join(d, "sshd_config")
        with open(config, "w") as f:
            f.write(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n"
                    f"AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\nStrictModes no\n"
                    "UsePAM no\nPermitRootLogin yes\nPasswordAuthentication no\nAllowTcpForwarding yes\n"
                    f"Ciphers {self.cipher}\n")
        os.makedirs("/run/sshd", exist_ok=True)
        self.popen(["/usr/sbin/sshd", "-D", "-e", "-f", config], stderr=subprocess.DEVNULL)
        _wait_port(port)
        a, b = _free_port(), _free_port()
        self.popen(["ssh", "-N", "-c", self.cipher, "-i", f"{d}/client_key", "-p", str(port),
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                    "-o", "Compression=no", "-L", f"{a}:127.0.0.1:{sink}", "-L", f"{b}:127.0.0.1:{source}",
                    f"{os.environ.get('USER', 'root')}@127.0.0.1"])
        _wait_port(a)
        _wait_port(b)
        return a, b


class Relay(Tunnel):
    counts_cpu = False

    def __init__(self) -> None:
        super().__init__("socat relay (no encryption)")

    def start(self, sink: int, source: int) -> tuple[int, int]:
        a, b = _free_port(), _free_port()
        for port, target in ((a, sink), (b, source)):
            self.popen(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"TCP:127.0.0.1:{target}"])
        _wait_port(a)
        _wait_port(b)
        return a, b


def upload(port: int, size: int) -> float:
    block = os.urandom(MiB)
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        for _ in range(size // MiB):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        got = int(s.recv(64) or b"0")
    dt = time.perf_counter() - t
    if got != size:
        raise RuntimeError(f"the sink got {got} of {size} bytes")
    return dt


def download(port: int, size: int) -> float:
    buf = bytearray(MiB)
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"{size}\n".encode())
        n = 0
        while n < size:
            k = s.recv_into(buf)
            if not k:
                raise RuntimeError(f"the source stopped after {n} of {size} bytes")
            n += k
    return time.perf_counter() - t


def first_byte(port: int) -> float:
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"1\n")
        s.recv(1)
    return time.perf_counter() - t


@contextlib.contextmanager
def endpoints() -> Iterator[tuple[int, int]]:
    procs = [subprocess.Popen([sys.executable, "-c", ENDPOINTS, role], stdout=subprocess.PIPE, text=True)
             for role in ("sink", "source")]
    try:
        yield int(procs[0].stdout.readline()), int(procs[1].stdout.readline())
    finally:
        for p in procs:
            p.kill()
            p.wait()


def measure(tunnel: Tunnel, size: int, runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"up": [], "down": [], "cpu_up": [], "cpu_down": [], "setup": []}
    with endpoints() as (sink, source):
        try:
            a, b = tunnel.start(sink, source)
            first_byte(b)  # the session and the first connection are up
            for _ in range(runs):
                for key, fn, port in (("up", upload, a), ("down", download, b)):
                    cpu = tunnel.cpu
                    dt = fn(port, size)
                    out[key].append(size / dt / 1e6)
                    out["cpu_" + key].append((tunnel.cpu - cpu) / (size / 1e9))
                out["setup"].append(statistics.median(first_byte(b) for _ in range(20)))
        finally:
            tunnel.stop()
    return out


def core_floor(size: int) -> tuple[float, float]:
    """CPU seconds per GB of the QUIC session alone (qh3 and netchan's sans-I/O
    core, both ends in this process, no socket, no event loop): what no
    plumbing can go below.  (sender, receiver)."""
    from netchan.session.core import SessionConfig, StreamData, StreamRequested
    from netchan.tools.testing import SessionPair

    pair = SessionPair.create("qh3", config=SessionConfig(packet_size=60000))
    pair.run()
    client, server = pair.client, pair.server
    sid = client.open_stream("sink")
    pair.run()
    for ev in pair.server_events:
        if isinstance(ev, StreamRequested):
            server.accept_stream(ev.stream_id)
    pair.run()
    block = bytes(256 * 1024)
    sent = got = 0
    cpu = [0.0, 0.0]
    now = pair.clock.now
    clock = time.process_time
    while got < size:
        t0 = clock()
        while sent < size and client.send_allowance(sid) >= len(block) and client.send_backlog(sid) < 4 * MiB:
            client.send_stream(sid, block)
            sent += len(block)
        now += 0.0001
        packets = client.packets_to_send(now)
        t1 = clock()
        server.receive_packets(packets, now)
        while (ev := server.next_event()) is not None:
            if isinstance(ev, StreamData):
                got += len(ev.data)
                server.stream_consumed(ev.stream_id, len(ev.data))
        answer = server.packets_to_send(now)
        t2 = clock()
        client.receive_packets(answer, now)
        while client.next_event() is not None:
            pass
        cpu[0] += t1 - t0 + clock() - t2
        cpu[1] += t2 - t1
    return cpu[0] / (size / 1e9), cpu[1] / (size / 1e9)


def run_all(runs: int, quick: bool) -> None:
    size = (128 if quick else 512) * MiB
    have_ssh = shutil.which("ssh") and os.path.exists("/usr/sbin/sshd")
    print(f"Tunnels: {size // MiB} MiB each way through a forwarded port, loopback (median of {runs} runs)\n")
    print(f"{'tunnel':40} {'up MB/s':>8} {'CPU s/GB':>9} {'down MB/s':>10} {'CPU s/GB':>9} {'set-up ms':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        cases: list[Tunnel] = [Netchan("tcp", tmp), Netchan("udp", tmp)]
        if have_ssh:
            cases += [Ssh("aes128-gcm@openssh.com", tmp), Ssh("chacha20-poly1305@openssh.com", tmp)]
        if shutil.which("socat"):
            cases.append(Relay())
        results = {}
        for tunnel in cases:
            r = measure(tunnel, size, runs)
            results[tunnel.label] = r
            med = {k: statistics.median(v) for k, v in r.items()}
            cpu_up, cpu_down = (f"{med['cpu_up']:9.2f}", f"{med['cpu_down']:9.2f}") if tunnel.counts_cpu \
                else (f"{'-':>9}", f"{'-':>9}")
            print(f"{tunnel.label:40} {med['up']:8.0f} {cpu_up} {med['down']:10.0f} "
                  f"{cpu_down} {med['setup'] * 1000:10.2f}", flush=True)
        floors = [core_floor(size // 2) for _ in range(runs)]
        floor = statistics.median(a + b for a, b in floors)
        print(f"{'QUIC session alone (no I/O), both ends':40} {'-':>8} {floor:9.2f} {'-':>10} {floor:9.2f} {'-':>10}")
        if not have_ssh:
            print("\n(no ssh/sshd here: install openssh-server to compare; make bench does)")
            return
        best = {d: max(statistics.median(results[t.label][d]) for t in cases if isinstance(t, Ssh))
                for d in ("up", "down")}
        print("\nratio to the fastest ssh cipher, this run:")
        for t in cases:
            if isinstance(t, Netchan):
                r = results[t.label]
                print(f"  {t.label:38} up {statistics.median(r['up']) / best['up']:.2f}x   "
                      f"down {statistics.median(r['down']) / best['down']:.2f}x")


if __name__ == "__main__":
    run_all(int(sys.argv[1]) if len(sys.argv) > 1 else 3, "--quick" in sys.argv)
