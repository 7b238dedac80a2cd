"""The VPN beside the link under it: iperf3 between two network namespaces,
straight over their veth link and through ``netchan vpn`` (over the udp and
the tcp carrier) on the same link, both directions.  Reported: MB/s, the
CPU seconds per GB of the VPN's two processes, the ratio to the bare link.
Needs root (CAP_NET_ADMIN), /dev/net/tun, ip and iperf3; says so otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

NS = ("ncbench-c", "ncbench-s")
SECONDS = 3


def why_not() -> str:
    if sys.platform != "linux" or not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    for tool in ("ip", "iperf3"):
        if shutil.which(tool) is None:
            return f"no {tool} (apt-get install iproute2 iperf3)"
    if os.geteuid() != 0:
        return "needs root for network namespaces and a TUN device"
    return ""


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def _namespaces() -> None:
    _teardown()
    for ns in NS:
        _sh("ip", "netns", "add", ns)
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
    _sh("ip", "link", "add", "nb0", "netns", NS[0], "type", "veth", "peer", "name", "nb1", "netns", NS[1])
    _sh("ip", "-n", NS[0], "addr", "add", "172.31.1.2/24", "dev", "nb0")
    _sh("ip", "-n", NS[1], "addr", "add", "172.31.1.1/24", "dev", "nb1")
    for ns, dev in ((NS[0], "nb0"), (NS[1], "nb1")):
        _sh("ip", "-n", ns, "link", "set", dev, "up")


def _teardown() -> None:
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _iperf(target: str, reverse: bool) -> float:
    """MB/s received, one run of SECONDS."""
    server = subprocess.Popen(["ip", "netns", "exec", NS[1], "iperf3", "-s", "-1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            done = subprocess.run(["ip", "netns", "exec", NS[0], "iperf3", "-c", target, "-t", str(SECONDS), "-J",
                                   *(["-R"] if reverse else [])], capture_output=True, text=True, timeout=60)
            try:
                return json.loads(done.stdout)["end"]["sum_received"]["bits_per_second"] / 8e6
            except (ValueError, KeyError):
                time.sleep(0.1)  # the server was not listening yet
        raise RuntimeError(f"iperf3 failed: {done.stdout[-300:]} {done.stderr[-300:]}")
    finally:
        server.kill()
        server.wait()


def _vpn(carrier: str, tmp: str) -> list[subprocess.Popen]:
    py = [sys.executable, "-m", "netchan"]
    keys = {}
    for name in ("server", "client"):
        keys[name] = os.path.join(tmp, f"{name}.key")
        out = subprocess.run([*py, "keygen", "-o", keys[name], "--force"], capture_output=True, text=True, check=True)
        keys[name + "_id"] = out.stdout.strip()
    url = f"{carrier}://172.31.1.1:7000"
    server = subprocess.Popen(["ip", "netns", "exec", NS[1], *py, "vpn", "serve", "--identity", keys["server"],
                               "--listen", url, "--allow", keys["client_id"], "--subnet", "10.78.0.0/24"],
                              stdout=subprocess.PIPE, text=True)
    procs = [server]
    while "VPN on" not in (line := server.stdout.readline()):
        if not line:
            raise RuntimeError("netchan vpn serve did not start")
    client = subprocess.Popen(["ip", "netns", "exec", NS[0], *py, "vpn", "connect", url, "--peer",
                               keys["server_id"], "--identity", keys["client"]], stdout=subprocess.PIPE, text=True)
    procs.append(client)
    while "VPN on" not in (line := client.stdout.readline()):
        if not line:
            raise RuntimeError("netchan vpn connect did not start")
    return procs


def _cpu(procs: list[subprocess.Popen]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = psutil.Process(p.pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_all(runs: int, quick: bool) -> None:
    reason = why_not()
    if reason:
        print(f"VPN: skipped ({reason})")
        return
    rows: list[tuple[str, dict[str, list[float]]]] = []
    _namespaces()
    try:
        cases = [("veth link, no tunnel", "", "172.31.1.1"), ("netchan vpn, udp carrier", "udp", "10.78.0.1"),
                 ("netchan vpn, tcp carrier", "tcp", "10.78.0.1")]
        for label, carrier, target in cases:
            figures: dict[str, list[float]] = {"up": [], "down": [], "cpu_up": [], "cpu_down": []}
            with tempfile.TemporaryDirectory() as tmp:
                procs = _vpn(carrier, tmp) if carrier else []
                try:
                    for _ in range(1 if quick else runs):
                        for key, reverse in (("up", False), ("down", True)):
                            cpu = _cpu(procs)
                            rate = _iperf(target, reverse)
                            figures[key].append(rate)
                            if procs:
                                figures["cpu_" + key].append((_cpu(procs) - cpu) / (rate * SECONDS / 1000))
                finally:
                    for p in procs:
                        p.terminate()
                    for p in procs:
                        p.wait(10)
            rows.append((label, figures))
    finally:
        _teardown()
    med = statistics.median
    base_up, base_down = med(rows[0][1]["up"]), med(rows[0][1]["down"])
    print(f"VPN: iperf3 between two network namespaces, {SECONDS} s each way (median of {1 if quick else runs} runs)")
    print()
    print(f"{'path':<30}{'up MB/s':>10}{'CPU s/GB':>10}{'down MB/s':>11}{'CPU s/GB':>10}{'vs link':>16}")
    for label, f in rows:
        cu = f"{med(f['cpu_up']):.2f}" if f["cpu_up"] else "-"
        cd = f"{med(f['cpu_down']):.2f}" if f["cpu_down"] else "-"
        ratio = f"{med(f['up']) / base_up:.2f}x / {med(f['down']) / base_down:.2f}x"
        print(f"{label:<30}{med(f['up']):>10.0f}{cu:>10}{med(f['down']):>11.0f}{cd:>10}{ratio:>16}")


if __name__ == "__main__":
    run_all(3, "--quick" in sys.argv)
