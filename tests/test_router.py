"""The listening node's packet routing, sans-I/O: header parsing, runs per
session, the unknown packet that opens a session, and the probe budget."""

from __future__ import annotations

from netchan.session.router import ProbeBudget, Router, destination_cid, opens_session
from netchan.session.scheduler import ANSWER, PROBE


def short(cid: bytes, body: bytes = b"x" * 20) -> bytes:
    return bytes([0x40]) + cid + body


def initial(cid: bytes, size: int = 1200) -> bytes:
    head = bytes([0xC0]) + b"\x00\x00\x00\x01" + bytes([len(cid)]) + cid
    return head + b"\x00" * (size - len(head))


def test_destination_ids_of_long_and_short_headers():
    assert destination_cid(short(b"ABCDEFGH")) == b"ABCDEFGH"
    assert destination_cid(initial(b"0123456789")) == b"0123456789"  # long headers say the length
    assert destination_cid(b"\x40abc") is None  # shorter than any id of ours


def test_only_a_full_sized_v1_initial_opens_a_session():
    cid = b"12345678"
    assert opens_session(initial(cid), cid)
    assert not opens_session(initial(cid, 1199), cid)  # not padded: no amplification
    assert not opens_session(short(cid), cid)
    version2 = bytearray(initial(cid))
    version2[1:5] = b"\x6b\x33\x43\xcf"
    assert not opens_session(bytes(version2), cid)
    assert not opens_session(initial(b"1234567"), b"1234567")  # id too short


def test_runs_keep_order_and_a_new_session_is_found_by_later_packets():
    router: Router[str, str] = Router()
    router.add_cid("a", b"AAAAAAAA")
    router.add_cid("b", b"BBBBBBBB")
    probe = PROBE + b"n" * 8
    packets = [short(b"AAAAAAAA"), short(b"AAAAAAAA"), short(b"BBBBBBBB"), probe,
               initial(b"CCCCCCCC"), initial(b"CCCCCCCC"), short(b"AAAAAAAA")]
    seen = []
    for kind, session, batch in router.route(packets):
        seen.append((kind, session, len(batch)))
        if kind == "unknown":
            router.add_cid("c", destination_cid(batch[0]))  # opened: the next packet finds it
    assert seen == [("session", "a", 2), ("session", "b", 1), ("probe", None, 1),
                    ("unknown", None, 1), ("session", "c", 1), ("session", "a", 1)]


def test_frames_of_a_layer_above_come_out_as_runs_in_order():
    """Packets without QUIC's fixed bit (other than probes, whose first byte is
    0) are a layer's frames: consecutive ones form one run, order is kept."""
    router: Router[str, str] = Router()
    router.add_cid("a", b"AAAAAAAA")
    probe = PROBE + b"n" * 8
    frame = b"\x01" + b"f" * 20
    packets = [frame, frame, short(b"AAAAAAAA"), frame, probe, frame, b"\x3f", short(b"AAAAAAAA")]
    seen = [(kind, session, len(batch)) for kind, session, batch in router.route(packets)]
    assert seen == [("frame", None, 2), ("session", "a", 1), ("frame", None, 1), ("probe", None, 1),
                    ("frame", None, 2), ("session", "a", 1)]


def test_paths_are_claimed_once_moved_and_forgotten():
    router: Router[str, str] = Router()
    router.claim_path("a", "p1")
    router.claim_path("b", "p1")  # another session's path is not taken
    assert router.by_path == {"p1": "a"}
    router.add_cid("a", b"AAAAAAAA")
    router.move_path("a", "p1", "p2")
    assert router.by_path == {"p2": "a"}
    router.remove_cid("b", b"AAAAAAAA")  # not b's: kept
    assert router.by_cid == {b"AAAAAAAA": "a"}
    router.forget("a", [b"AAAAAAAA"], "p2")
    assert router.by_cid == {} and router.by_path == {}


def test_probe_answers_are_budgeted_per_path_and_for_unproven_paths():
    budget: ProbeBudget[str] = ProbeBudget(per_path=3, unproven_per_second=4)
    probe = PROBE + b"12345678"
    assert budget.answer(probe, "p", True, 0.0) == ANSWER + b"12345678"  # same size
    assert budget.answer(b"\x00junk", "p", True, 0.0) is None
    assert [budget.answer(probe, "p", True, 0.1) is not None for _ in range(3)] == [True, True, False]
    # unproven paths share 4 answers a second, whatever their number
    answers = [budget.answer(probe, f"u{i}", False, 0.2) is not None for i in range(6)]
    assert answers == [True] * 4 + [False] * 2
    assert budget.answer(probe, "p2", True, 0.3) is not None  # a proven path is not starved
    assert budget.answer(probe, "u9", False, 1.0) is not None  # a second later: refilled
