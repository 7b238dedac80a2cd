"""Coverage-guided fuzz targets (atheris), one per decoder a stranger or a
peer can reach.  ``python fuzz/targets.py NAME [libFuzzer flags] [CORPUS]``
runs one; ``make fuzz`` runs them all for a set time (see fuzz/run.py).

Each target feeds the bytes the fuzzer makes to one decoder, in pieces
where the decoder takes a stream, and lets only that decoder's protocol
error through: any other exception, a hang or a buffer over its bound is a
finding, saved under fuzz/crashes/ and, once fixed, kept in fuzz/corpus/
as a regression case (tests/test_decoders.py replays them)."""

from __future__ import annotations

import asyncio
import pathlib
import sys

import atheris

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from fuzz.harness import Framed, decode_item, read_now
    from netchan.channels import frames as chf
    from netchan.coordinator import protocol as coord
    from netchan.errors import RemoteProtocolError
    from netchan.session.control import MAX_MESSAGE, ControlFrames
    from netchan.session.retry import RetryTokens, initial_fields
    from netchan.session.router import ProbeBudget, Router
    from netchan.tunnels import protocol as tun
    from netchan.tunnels.socks5 import Socks5, _parse_udp, _Refused


def _cut(data: bytes) -> list[bytes]:
    """The input in pieces: its first byte says where the first cut is."""
    if not data:
        return [data]
    at = data[0] % max(1, len(data))
    return [data[1 : 1 + at], data[1 + at :]]


def tcp_framing(data: bytes) -> None:
    conn = Framed()
    conn.feed_pieces(_cut(data))
    assert conn.bounded()


def control(data: bytes) -> None:
    frames = ControlFrames()
    try:
        for chunk in _cut(data):
            frames.feed(chunk)
    except RemoteProtocolError:
        return
    assert len(frames.buf) <= MAX_MESSAGE + 2


def channel_frames(data: bytes) -> None:
    for handshaken in (False, True):
        reader = chf.FrameReader(chf.max_frame(1 << 20), handshaken=handshaken)
        try:
            for chunk in _cut(data):
                for frame in reader.feed(chunk):
                    if not handshaken:
                        for kind in (chf.Hello, chf.Reply):
                            try:
                                chf.handshake(frame, kind)
                            except RemoteProtocolError:
                                pass
                        break
        except RemoteProtocolError:
            pass


def messages(data: bytes) -> None:
    read_now(data, tun._decoder, tun.MAX_HEADER)
    read_now(data, coord.decoder, coord.MAX_MESSAGE)


_router = Router()
_budget = ProbeBudget()
_tokens = RetryTokens()


def packets(data: bytes) -> None:
    batch = [data[i : i + 97] for i in range(0, len(data), 97)] or [b""]
    for _kind, _session, run in _router.route(batch):
        for p in run:
            _budget.answer(p, "path", False, 0.0)
            fields = initial_fields(p)
            if fields is not None:
                assert _tokens.check(b"addr", fields[2], fields[0]) is None


class _Writer:
    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass


async def _socks_handshake(data: bytes) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    front = Socks5.__new__(Socks5)  # only its handshake: no listener
    front.users = {"u": "p"} if data[:1] == b"\x01" else {}
    try:
        await front._handshake(reader, _Writer())  # type: ignore[arg-type]
    except (asyncio.IncompleteReadError, _Refused):
        pass


_loop = asyncio.new_event_loop()


def socks5(data: bytes) -> None:
    parsed = _parse_udp(data)
    assert parsed is None or 0 <= parsed[1] <= 0xFFFF
    _loop.run_until_complete(_socks_handshake(data))


TARGETS = {"tcp": tcp_framing, "control": control, "frames": channel_frames, "items": decode_item,
           "messages": messages, "packets": packets, "socks5": socks5}


def main() -> None:
    from run import TARGETS as NAMES  # the runner's list, kept in step

    assert sorted(TARGETS) == NAMES, "fuzz/run.py lists other targets"
    name = sys.argv[1]
    target = TARGETS[name]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
