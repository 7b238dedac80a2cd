"""Run every fuzz target (fuzz/targets.py) for a while: ``make fuzz``, or
``python fuzz/run.py [--seconds N | --runs N] [--only NAME ...]``.

Each target runs in its own process with a working corpus under
``.fuzz/NAME`` (not kept); an input that breaks a decoder is written to
``fuzz/corpus/NAME/`` (kept: tests/test_decoders.py replays it, so it fails
until the decoder is fixed).  Prints how many inputs each target ran and
what it found."""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
#: the targets of fuzz/targets.py (not imported here: importing it instruments netchan)
TARGETS = ["control", "frames", "items", "messages", "packets", "socks5", "tcp"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    p.add_argument("--runs", type=int, help="inputs per target instead of a time")
    p.add_argument("--only", nargs="*", choices=sorted(TARGETS), help="these targets only")
    args = p.parse_args()
    rows = []
    failed = False
    for name in args.only or sorted(TARGETS):
        work = HERE.parent / ".fuzz" / name
        work.mkdir(parents=True, exist_ok=True)
        found = HERE / "corpus" / name
        found.mkdir(parents=True, exist_ok=True)
        before = set(found.iterdir())
        limit = [f"-runs={args.runs}"] if args.runs else [f"-max_total_time={args.seconds}"]
        started = time.monotonic()
        done = subprocess.run([sys.executable, str(HERE / "targets.py"), name, *limit, "-timeout=10",
                               "-rss_limit_mb=2048", f"-artifact_prefix={found}/", str(work)],
                              capture_output=True, text=True)
        took = time.monotonic() - started
        runs = re.findall(r"Done (\d+) runs", done.stderr)
        new = sorted(set(found.iterdir()) - before)
        if done.returncode != 0 or new:
            failed = True
            print(done.stderr[-3000:], file=sys.stderr)
        rows.append((name, int(runs[-1]) if runs else 0, took, [f.name for f in new]))
        print(f"{name:10} {rows[-1][1]:>12,} inputs in {took:6.0f} s  "
              + (f"FOUND {', '.join(rows[-1][3])}" if new else ("no finding" if done.returncode == 0
                                                               else f"exit status {done.returncode}")),
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
