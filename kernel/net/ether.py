"""Ethernet II framing (IEEE 802.3 with the DIX type field).

A frame as the stack sees it: destination MAC (6), source MAC (6), ethertype (2),
payload. No FCS (the link strips it) and no minimum-size padding on transmit (a virtio
link does not need it; the device pads if its medium needs that). On receive a frame
shorter than the 14-byte header is a runt; an ethertype below 0x0600 is an 802.3
length field (no LLC/SNAP here) and counted as a bad frame like any type we do not
speak.
"""

from __future__ import annotations

import struct

__all__ = ["ETH_HLEN", "ETH_P_IP", "ETH_P_ARP", "ETH_HDR", "build_frame"]

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_HDR = struct.Struct("!6s6sH")


def build_frame(dst: bytes, src: bytes, ethertype: int, payload: bytes | bytearray) -> bytes:
    """One Ethernet II frame."""
    return ETH_HDR.pack(dst, src, ethertype) + payload
