"""The sans-IO half of tracing: payload decoders on hand-built virtio-blk requests and
frames, the schema's line validation, the seq counter and the text format."""

from __future__ import annotations

import json
import struct

import pytest

from vdev.virtio.trace import (
    SCHEMA_VERSION,
    SeqCounter,
    TraceFormatError,
    Tracer,
    decode_blk_request,
    decode_blk_status,
    decode_line,
    decode_net_hdr,
    format_text,
    read_events,
    summarize_frame,
)

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")


def _eth(etype: int, body: bytes, dst: bytes = MAC_B, src: bytes = MAC_A) -> bytes:
    return dst + src + etype.to_bytes(2, "big") + body


def _ipv4(
    proto: int,
    payload: bytes,
    src: str = "10.0.0.1",
    dst: str = "10.0.0.2",
    ttl: int = 64,
    frag: int = 0,
) -> bytes:
    s = bytes(int(x) for x in src.split("."))
    d = bytes(int(x) for x in dst.split("."))
    hdr = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, frag, ttl, proto, 0, s, d)
    return hdr + payload


# ------------------------------------------------------------------ virtio-blk


def test_blk_read_request() -> None:
    header = struct.pack("<IIQ", 0, 0, 2048)
    assert decode_blk_request(header, 8192) == {"type": "IN", "sector": 2048, "sectors": 16}


def test_blk_write_flush_getid() -> None:
    assert decode_blk_request(struct.pack("<IIQ", 1, 0, 7), 512)["type"] == "OUT"
    flush = decode_blk_request(struct.pack("<IIQ", 4, 0, 0), 0)
    assert flush == {"type": "FLUSH", "sector": 0, "sectors": 0}
    assert decode_blk_request(struct.pack("<IIQ", 8, 0, 0), 20)["type"] == "GET_ID"
    assert decode_blk_request(struct.pack("<IIQ", 99, 0, 0), 0)["type"] == "type99"


def test_blk_discard_takes_its_segment() -> None:
    header = struct.pack("<IIQ", 11, 0, 0)
    segment = struct.pack("<QII", 4096, 64, 0)
    assert decode_blk_request(header, 0, segment) == {
        "type": "DISCARD",
        "sector": 4096,
        "sectors": 64,
    }
    wz = decode_blk_request(struct.pack("<IIQ", 13, 0, 0), 0, struct.pack("<QII", 8, 2, 1))
    assert wz == {"type": "WRITE_ZEROES", "sector": 8, "sectors": 2}


def test_blk_short_header_is_an_error_not_an_exception() -> None:
    assert "error" in decode_blk_request(b"\x00" * 7, 0)


def test_blk_status() -> None:
    assert decode_blk_status(b"\x00") == "OK"
    assert decode_blk_status(b"\x01") == "IOERR"
    assert decode_blk_status(b"\x02") == "UNSUPP"
    assert decode_blk_status(b"\x09") == "status9"
    assert decode_blk_status(b"") == "?"


# ------------------------------------------------------------------ virtio-net


def test_net_header_fields() -> None:
    raw = struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 1)
    assert decode_net_hdr(raw) == {
        "flags": ["NEEDS_CSUM"],
        "gso_type": "tcpv4",
        "hdr_len": 54,
        "gso_size": 1448,
        "csum_start": 34,
        "csum_offset": 16,
        "num_buffers": 1,
    }
    ecn = decode_net_hdr(struct.pack("<BBHHHHH", 2, 0x81, 0, 0, 0, 0, 3))
    assert ecn["flags"] == ["DATA_VALID"] and ecn["gso_type"] == "tcpv4|ecn"
    assert ecn["num_buffers"] == 3
    assert "error" in decode_net_hdr(b"\x00" * 11)


def test_arp_request_and_reply() -> None:
    req = struct.pack(
        ">HHBBH6s4s6s4s",
        1,
        0x0800,
        6,
        4,
        1,
        MAC_A,
        bytes([10, 0, 0, 1]),
        b"\0" * 6,
        bytes([10, 0, 0, 2]),
    )
    assert summarize_frame(_eth(0x0806, req, dst=b"\xff" * 6)) == (
        "ARP who-has 10.0.0.2 tell 10.0.0.1"
    )
    rep = struct.pack(
        ">HHBBH6s4s6s4s",
        1,
        0x0800,
        6,
        4,
        2,
        MAC_B,
        bytes([10, 0, 0, 2]),
        MAC_A,
        bytes([10, 0, 0, 1]),
    )
    assert summarize_frame(_eth(0x0806, rep)) == "ARP 10.0.0.2 is-at 02:00:00:00:00:02"


def test_icmp_echo() -> None:
    icmp = struct.pack(">BBHHH", 8, 0, 0, 0x1234, 7) + b"ping"
    assert summarize_frame(_eth(0x0800, _ipv4(1, icmp))) == (
        "IPv4 10.0.0.1 > 10.0.0.2 ttl 64 len 32 ICMP echo request id 4660 seq 7"
    )
    reply = struct.pack(">BBHHH", 0, 0, 0, 1, 2)
    assert "ICMP echo reply id 1 seq 2" in summarize_frame(_eth(0x0800, _ipv4(1, reply)))
    unreach = struct.pack(">BBHI", 3, 3, 0, 0)
    assert "ICMP unreachable code 3" in summarize_frame(_eth(0x0800, _ipv4(1, unreach)))


def test_udp() -> None:
    udp = struct.pack(">HHHH", 5000, 7, 8 + 5, 0) + b"hello"
    assert summarize_frame(_eth(0x0800, _ipv4(17, udp, ttl=3))) == (
        "IPv4 10.0.0.1 > 10.0.0.2 ttl 3 len 33 UDP 5000 > 7 len 5"
    )


def test_tcp_flags_and_length() -> None:
    tcp = struct.pack(">HHIIBBHHH", 40000, 80, 1000, 2000, 5 << 4, 0x12, 65535, 0, 0)
    assert summarize_frame(_eth(0x0800, _ipv4(6, tcp + b"abc"))) == (
        "IPv4 10.0.0.1 > 10.0.0.2 ttl 64 len 43 TCP 40000 > 80 [S.] seq 1000 ack 2000 "
        "win 65535 len 3"
    )


def test_fragments() -> None:
    later = _ipv4(17, b"x" * 16, frag=185)  # offset 185 * 8 = 1480
    assert summarize_frame(_eth(0x0800, later)).endswith("frag off 1480 proto 17")
    first = _ipv4(17, struct.pack(">HHHH", 1, 2, 3000, 0), frag=0x2000)
    text = summarize_frame(_eth(0x0800, first))
    assert "frag off 0 MF" in text and "UDP 1 > 2" in text


@pytest.mark.parametrize(
    ("frame", "expect"),
    [
        (b"\x00" * 13, "truncated ethernet (13 bytes)"),
        (_eth(0x0806, b"\x00" * 10), "ARP truncated"),
        (_eth(0x0800, b"\x45" + b"\x00" * 10), "IPv4 truncated"),
        (_eth(0x0800, b"\x4f" + b"\x00" * 19), "IPv4 bad header (version/IHL 0x4f)"),
        (_eth(0x0800, b"\x65" + b"\x00" * 19), "IPv4 bad header (version/IHL 0x65)"),
    ],
)
def test_truncated_and_bad_frames(frame: bytes, expect: str) -> None:
    assert summarize_frame(frame) == expect


def test_truncated_l4_headers() -> None:
    for proto, name in ((1, "ICMP"), (17, "UDP"), (6, "TCP")):
        assert summarize_frame(_eth(0x0800, _ipv4(proto, b"\x00" * 4))).endswith(
            f"{name} truncated"
        )


def test_other_ethertype() -> None:
    text = summarize_frame(_eth(0x88B5, b"\x00" * 50))
    assert text == "02:00:00:00:00:01 > 02:00:00:00:00:02 ethertype 0x88b5 len 64"


# ------------------------------------------------------------------ schema


def _event(**over: object) -> dict[str, object]:
    lines: list[str] = []
    t = Tracer(lines.append, lambda: 123, pid=10, kpid=9, dev="vda", side="driver")
    t.emit("add", 0, 5, 3, descs=[[4096, 16, 1]], payload=None)
    ev = json.loads(lines[0])
    ev.update(over)
    return ev


def test_tracer_writes_whole_lines_with_every_header_key() -> None:
    lines: list[str] = []
    t = Tracer(lines.append, lambda: 42, pid=1, kpid=1, dev="eth0", side="device")
    t.emit("push", 1, 70000, 4, len=12)
    t.fault("drop_kick", 1, count=2)
    assert all(line.endswith("\n") and line.count("\n") == 1 for line in lines)
    push = decode_line(lines[0])
    assert push == {
        "v": SCHEMA_VERSION,
        "ts": 42,
        "pid": 1,
        "kpid": 1,
        "dev": "eth0",
        "side": "device",
        "q": 1,
        "kind": "push",
        "seq": 70000,
        "head": 4,
        "len": 12,
    }
    fault = decode_line(lines[1])
    assert fault["kind"] == "fault" and fault["name"] == "drop_kick"
    assert fault["details"] == {"count": 2}


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("not json\n", "not JSON"),
        ("[1, 2]\n", "not a JSON object"),
        (json.dumps(_event(v=None)) + "\n", "no schema version"),
        (json.dumps(_event(v=SCHEMA_VERSION + 1)) + "\n", "newer"),
        (json.dumps(_event(ts="x")) + "\n", "'ts' is not an integer"),
        (json.dumps(_event(side="guest")) + "\n", "'side'"),
        (json.dumps(_event(seq=1.5)) + "\n", "'seq' is not an integer or null"),
        (json.dumps(_event(kind=3)) + "\n", "'kind' is not a string"),
        (json.dumps(_event())[:40], "truncated line"),
    ],
)
def test_decode_line_names_the_problem(line: str, problem: str) -> None:
    with pytest.raises(TraceFormatError, match=problem):
        decode_line(line)


def test_read_events_names_the_line() -> None:
    good = json.dumps(_event()) + "\n"
    with pytest.raises(TraceFormatError, match=r"^line 3: not JSON"):
        list(read_events([good, "\n", "{oops\n", good]))
    assert len(list(read_events([good, good, good], max_events=2))) == 2


def test_seq_counter_extends_past_16_bits() -> None:
    c = SeqCounter()
    values = [c.extend(i & 0xFFFF) for i in range(65530, 65540)]
    assert values == list(range(65530, 65540))
    c2 = SeqCounter(start=100)
    assert c2.extend(100) == 100 and c2.extend(5) == 65536 + 5


def test_text_line_is_aligned_and_decoded() -> None:
    ev = _event(payload={"blk": {"type": "OUT", "sector": 8, "sectors": 8}}, ts=2_500_000)
    line = format_text(ev, t0=500_000)
    assert line.startswith("       2.000")
    assert "vda" in line and "drv q0" in line and "seq=5 head=3" in line
    assert "[0x1000+16r]" in line and "blk OUT sector 8 x8" in line
    net = _event(
        kind="reap",
        payload={
            "net": decode_net_hdr(struct.pack("<BBHHHHH", 2, 0, 0, 0, 0, 0, 1)),
            "frame": "ARP who-has 10.0.0.2 tell 10.0.0.1",
        },
    )
    assert "hdr DATA_VALID | ARP who-has 10.0.0.2 tell 10.0.0.1" in format_text(net)
    # the columns before the fields have one width whatever the values
    a = format_text(_event(kind="add", seq=1, head=1))
    b = format_text(_event(kind="irq_recv", seq=None, head=None, reaped=3))
    assert a.index("add") == b.index("irq_recv")
