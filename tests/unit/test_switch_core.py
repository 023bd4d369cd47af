"""The learning switch's forwarding logic (:class:`vdev.switch.SwitchCore`) without I/O:
flooding, learning, unicast forwarding, filtering, ageing with an injected clock, the MAC
table cap, port removal; plus the offload adaptation and the hello codec."""

from __future__ import annotations

import struct

import msgpack
import pytest

from vdev.switch import (
    MAX_FRAME,
    MacTable,
    SwitchCore,
    SwitchFull,
    adapt_frame,
    check_hdr,
    decode_hello,
    encode_hello,
)
from vdev.virtio.net import GSO_TCPV4, GSO_UDP, HDR_F_DATA_VALID, HDR_F_NEEDS_CSUM, NetHdr
from vdev.virtio.packet import inet_checksum, ipv4_pseudo_sum

BCAST = b"\xff" * 6


def mac(n: int) -> bytes:
    return bytes([2, 0, 0, 0, 0, n])


def frame(dst: bytes, src: bytes, payload: bytes = b"x" * 46) -> bytes:
    return dst + src + b"\x08\x00" + payload


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(clock: Clock) -> SwitchCore:
    c = SwitchCore(age_s=300.0, max_macs=8, clock=clock)
    for name in ("a", "b", "c"):
        c.add_port(name)
    return c


def test_unknown_destination_and_broadcast_flood_to_every_other_port(core: SwitchCore) -> None:
    outs, flooded = core.decide(1, frame(BCAST, mac(1)))
    assert (sorted(outs), flooded) == ([2, 3], True)
    outs, flooded = core.decide(2, frame(mac(9), mac(2)))  # nobody has 9
    assert (sorted(outs), flooded) == ([1, 3], True)
    outs, flooded = core.decide(3, frame(b"\x01\x00\x5e\x00\x00\x01", mac(3)))  # multicast
    assert (sorted(outs), flooded) == ([1, 2], True)
    assert core.counters.flooded == 3 and core.counters.forwarded == 0
    assert [core.ports[p].counters.rx_frames for p in (1, 2, 3)] == [1, 1, 1]


def test_learned_unicast_goes_to_one_port_only(core: SwitchCore) -> None:
    core.decide(2, frame(BCAST, mac(2)))  # b announces itself
    outs, flooded = core.decide(1, frame(mac(2), mac(1)))
    assert (outs, flooded) == ((2,), False)
    outs, _ = core.decide(2, frame(mac(1), mac(2)))  # and a was learned from that frame
    assert outs == (1,)
    assert core.counters.forwarded == 2
    assert core.table.learned == 2


def test_frame_to_a_station_on_its_own_port_is_filtered(core: SwitchCore) -> None:
    core.decide(1, frame(BCAST, mac(1)))
    core.decide(1, frame(BCAST, mac(5)))  # two stations behind port 1
    assert core.decide(1, frame(mac(5), mac(1))) == ((), False)
    assert core.counters.filtered == 1


def test_a_station_that_moves_is_followed(core: SwitchCore) -> None:
    core.decide(1, frame(BCAST, mac(7)))
    core.decide(3, frame(BCAST, mac(7)))
    assert core.decide(2, frame(mac(7), mac(2)))[0] == (3,)
    assert core.table.moved == 1


def test_entries_age_out_then_the_destination_is_flooded(core: SwitchCore, clock: Clock) -> None:
    core.decide(2, frame(BCAST, mac(2)))
    clock.now += 299.0
    assert core.decide(1, frame(mac(2), mac(1)))[0] == (2,)
    clock.now += 1.0  # 300 s since mac(2) was last seen
    outs, flooded = core.decide(1, frame(mac(2), mac(1)))
    assert flooded and sorted(outs) == [2, 3]
    assert core.table.aged == 1


def test_seeing_a_station_again_refreshes_its_entry(core: SwitchCore, clock: Clock) -> None:
    core.decide(2, frame(BCAST, mac(2)))
    clock.now += 200.0
    core.decide(2, frame(BCAST, mac(2)))
    clock.now += 200.0
    assert core.decide(1, frame(mac(2), mac(1)))[0] == (2,)


def test_expire_sweeps_only_stale_entries(clock: Clock) -> None:
    t = MacTable(age_s=10.0, capacity=100, clock=clock)
    t.learn(mac(1), 1)
    clock.now += 5
    t.learn(mac(2), 2)
    assert t.next_expiry() == pytest.approx(clock.now + 5)
    clock.now += 5
    assert t.expire() == 1
    assert [m for m, _, _ in t.entries()] == [mac(2)]
    clock.now += 5
    assert t.expire() == 1 and len(t) == 0 and t.next_expiry() is None
    assert t.aged == 2


def test_mac_table_is_capped_and_evicts_the_least_recently_seen(
    core: SwitchCore, clock: Clock
) -> None:
    for n in range(1, 9):  # fills the 8 entries
        clock.now += 1
        core.decide(1, frame(BCAST, mac(n)))
    clock.now += 1
    core.decide(1, frame(BCAST, mac(1)))  # refresh 1: now 2 is the oldest
    core.decide(2, frame(BCAST, mac(20)))
    assert len(core.table) == 8
    assert core.table.evicted == 1
    assert mac(2) not in core.table and mac(1) in core.table and mac(20) in core.table


def test_removing_a_port_forgets_its_stations(core: SwitchCore) -> None:
    core.decide(3, frame(BCAST, mac(3)))
    core.decide(3, frame(BCAST, mac(4)))
    core.decide(1, frame(BCAST, mac(1)))
    gen = core.generation
    assert core.remove_port(3) is not None
    assert core.generation == gen + 1
    assert mac(3) not in core.table and mac(4) not in core.table and mac(1) in core.table
    outs, flooded = core.decide(1, frame(mac(3), mac(1)))
    assert flooded and outs == (2,)
    assert core.remove_port(3) is None
    assert core.counters.ports_removed == 1


def test_registered_mac_is_known_before_it_speaks(clock: Clock) -> None:
    c = SwitchCore(clock=clock)
    c.add_port("a", mac=mac(1))
    c.add_port("b", mac=mac(2))
    assert c.decide(1, frame(mac(2), mac(1))) == ((2,), False)


def test_bad_frames_are_dropped_and_counted(core: SwitchCore) -> None:
    assert core.decide(1, b"\xff" * 13) == ((), False)  # runt
    assert core.decide(1, frame(mac(2), b"\x01\x02\x03\x04\x05\x06")) == ((), False)
    assert core.decide(1, frame(b"\x01\x80\xc2\x00\x00\x00", mac(1))) == ((), False)  # STP
    assert core.decide(1, b"\xff" * (MAX_FRAME + 1)) == ((), False)
    c = core.counters
    assert (c.runts, c.bad_source, c.link_local, c.oversize) == (1, 1, 1, 1)
    assert c.dropped == 4 and core.ports[1].counters.dropped == 4
    assert core.ports[1].counters.rx_frames == 4
    # a group address is never learned as a source; the 802.1D frame came from mac(1)
    # and only its forwarding is refused (learning comes first, as in 802.1D)
    assert b"\x01\x02\x03\x04\x05\x06" not in core.table and mac(1) in core.table


def test_frames_from_an_unknown_port_are_dropped(core: SwitchCore) -> None:
    assert core.decide(42, frame(BCAST, mac(1))) == ((), False)
    assert core.counters.unregistered == 1


def test_transmit_counters(core: SwitchCore) -> None:
    core.count_tx(2, 100, True)
    core.count_tx(2, 60, False)
    core.count_full(3)
    pc = core.ports[2].counters
    assert (pc.tx_frames, pc.tx_bytes, pc.flooded) == (2, 160, 1)
    assert core.ports[3].counters.dropped == 1 and core.counters.full == 1


def test_port_cap(clock: Clock) -> None:
    c = SwitchCore(max_ports=2, clock=clock)
    c.add_port("a")
    c.add_port("b")
    with pytest.raises(SwitchFull):
        c.add_port("c")
    assert c.counters.ports_refused == 1
    c.remove_port(1)
    assert c.add_port("c").number == 3  # numbers are never reused


def test_stats_are_plain_data(core: SwitchCore) -> None:
    core.decide(1, frame(BCAST, mac(1)))
    st = msgpack.unpackb(msgpack.packb(core.stats()), raw=False)
    assert st["switch"]["ports"] == 3 and st["switch"]["macs"] == 1
    assert {p["name"] for p in st["ports"]} == {"a", "b", "c"}
    assert st["macs"][0][:2] == ["02:00:00:00:00:01", 1]


def test_update_port_changes_offloads_and_bumps_generation(core: SwitchCore) -> None:
    gen = core.generation
    core.update_port(1, name="a2", mac=mac(1), accepts=frozenset({"csum", "tso4", "bogus"}))
    p = core.ports[1]
    assert (p.name, p.accepts, core.generation) == ("a2", frozenset({"csum", "tso4"}), gen + 1)
    core.update_port(1, name="a2", mac=mac(1), accepts=frozenset({"tso4"}))
    assert core.ports[1].accepts == frozenset()  # TSO needs csum (§5.1.3.1)


# ------------------------------------------------------------------ offloads


def _udp_frame(payload: bytes) -> tuple[NetHdr, bytes]:
    """A UDP/IPv4 frame with a partial checksum (the pseudo-header sum), NEEDS_CSUM."""
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    ulen = 8 + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 1, 0, 64, 17, 0, src, dst))
    ip[10:12] = struct.pack("!H", inet_checksum(ip))
    partial = ipv4_pseudo_sum(src, dst, 17, ulen)
    udp = struct.pack("!HHHH", 1234, 5678, ulen, partial)
    f = mac(2) + mac(1) + b"\x08\x00" + bytes(ip) + udp + payload
    return NetHdr(flags=HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6), f


def test_adapt_completes_the_checksum_for_a_port_without_csum() -> None:
    hdr, f = _udp_frame(b"hello world")
    [(h, out)] = adapt_frame(hdr, f, frozenset())
    assert h == NetHdr()
    # a complete UDP checksum sums (with the pseudo-header) to 0xFFFF
    out = bytes(out)
    udp = out[34:]
    assert udp[6:8] != f[40:42]  # the partial sum was replaced
    assert inet_checksum(udp, ipv4_pseudo_sum(out[26:30], out[30:34], 17, len(udp))) == 0
    [(h2, same)] = adapt_frame(hdr, f, frozenset({"csum"}))
    assert h2 is hdr and same is f


def test_adapt_clears_data_valid_for_a_port_without_csum() -> None:
    f = frame(mac(2), mac(1))
    [(h, out)] = adapt_frame(NetHdr(flags=HDR_F_DATA_VALID), f, frozenset())
    assert h.flags == 0 and out == f


def test_check_hdr_follows_the_transmit_rules() -> None:
    assert check_hdr(NetHdr(), 60) is None
    assert check_hdr(NetHdr(gso_type=GSO_UDP, flags=1, gso_size=100), 60) is not None
    assert check_hdr(NetHdr(gso_type=GSO_TCPV4, gso_size=100), 60) is not None  # no csum
    assert check_hdr(NetHdr(gso_type=GSO_TCPV4, flags=1), 60) is not None  # no gso_size
    assert check_hdr(NetHdr(flags=HDR_F_NEEDS_CSUM, csum_start=50, csum_offset=9), 60)
    assert check_hdr(NetHdr(flags=HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6), 60) is None


# ------------------------------------------------------------------ the hello codec


def test_hello_round_trip() -> None:
    kind, payload = encode_hello(name="eth0", mac=mac(1), accepts=frozenset({"csum"}), pid=42)
    assert kind == b"H"
    assert decode_hello(payload) == ("eth0", mac(1), frozenset({"csum"}), 42)


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # not msgpack
        msgpack.packb([1, 2]),
        msgpack.packb({"v": 2}),
        msgpack.packb({"v": 1, "mac": b"\x01" * 6}),  # multicast
        msgpack.packb({"v": 1, "mac": b"\x02" * 5}),
        msgpack.packb({"v": 1, "name": "x" * 65}),
        msgpack.packb({"v": 1, "name": "a\nb"}),
        msgpack.packb({"v": 1, "accepts": "csum"}),
        msgpack.packb({"v": 1, "pid": -1}),
        msgpack.packb({"v": 1, "pid": True}),
    ],
)
def test_bad_hellos_are_refused_with_a_reason(body: bytes) -> None:
    with pytest.raises(ValueError):
        decode_hello(body)
