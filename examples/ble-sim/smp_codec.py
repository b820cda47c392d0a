"""SMP (MCUmgr) packets as the Bluetooth LE transport carries them, for the BLE simulator's relay
and its self-test central: the 8-byte SMP header, a reassembler that cuts a byte stream into
packets by the header's length, the small subset of CBOR that SMP bodies use, and an MCUboot
image builder.

What it is: plain Python (standard library only), written from the mcumgr SMP protocol
description, the CBOR specification (RFC 8949) and MCUboot's image format.

What it is not: an SMP device. The simulated device is the Rust `leaf-sim` (examples/leaf-sim);
the relay in ble_sim.py only peeks at headers and upload offsets to log them and to fire its
faults, and check_sim.py uses these helpers as any SMP client would. The CBOR codec covers
what SMP uses (unsigned and negative integers, byte and text strings, arrays, maps, booleans,
null; indefinite lengths when decoding), not floats or tags.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

# SMP operations.
OP_READ = 0
OP_READ_RSP = 1
OP_WRITE = 2
OP_WRITE_RSP = 3

# Groups and commands used here.
GROUP_OS = 0
GROUP_IMAGE = 1
OS_ECHO = 0
OS_RESET = 5
OS_PARAMS = 6
IMG_STATE = 0
IMG_UPLOAD = 1

HEADER_SIZE = 8


@dataclass(frozen=True)
class Header:
    """The SMP header: op (3 bits), version (2 bits: 0 = SMP v1, 1 = v2), flags, body length,
    group, sequence number, command id."""

    op: int
    group: int
    id: int
    seq: int
    length: int
    version: int = 1
    flags: int = 0

    def pack(self) -> bytes:
        return struct.pack(
            '>BBHHBB',
            ((self.version & 3) << 3) | (self.op & 7),
            self.flags,
            self.length,
            self.group,
            self.seq,
            self.id,
        )

    @classmethod
    def parse(cls, data: bytes) -> Header:
        if len(data) < HEADER_SIZE:
            raise ValueError(f'an SMP header needs 8 bytes, got {len(data)}')
        b0, flags, length, group, seq, cmd = struct.unpack_from('>BBHHBB', data)
        return cls(
            op=b0 & 7,
            group=group,
            id=cmd,
            seq=seq,
            length=length,
            version=(b0 >> 3) & 3,
            flags=flags,
        )


def packet(op: int, group: int, cmd: int, seq: int, body: dict | None = None) -> bytes:
    """An SMP v2 request: header and CBOR body (an empty map when `body` is None)."""
    payload = cbor_encode(body if body is not None else {})
    return Header(op=op, group=group, id=cmd, seq=seq, length=len(payload)).pack() + payload


class Reassembler:
    """Cuts a byte stream (or a run of notifications) into SMP packets by the header's length."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer.extend(data)
        packets = []
        while len(self.buffer) >= HEADER_SIZE:
            size = HEADER_SIZE + Header.parse(self.buffer).length
            if len(self.buffer) < size:
                break
            packets.append(bytes(self.buffer[:size]))
            del self.buffer[:size]
        return packets

    def reset(self) -> None:
        self.buffer.clear()

    @property
    def partial(self) -> int:
        """Bytes of a packet not complete yet."""
        return len(self.buffer)


def split(packet_bytes: bytes) -> tuple[Header, Any]:
    """Splits an SMP packet into its header and decoded body."""
    header = Header.parse(packet_bytes)
    body = packet_bytes[HEADER_SIZE : HEADER_SIZE + header.length]
    if len(body) != header.length:
        raise ValueError('SMP packet shorter than its header says')
    return header, cbor_decode(body) if body else {}


# --- CBOR (the subset SMP uses) ---------------------------------------------------------------


def _head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([major << 5 | value])
    if value < 1 << 8:
        return bytes([major << 5 | 24, value])
    if value < 1 << 16:
        return bytes([major << 5 | 25]) + struct.pack('>H', value)
    if value < 1 << 32:
        return bytes([major << 5 | 26]) + struct.pack('>I', value)
    return bytes([major << 5 | 27]) + struct.pack('>Q', value)


def cbor_encode(value: Any) -> bytes:
    """Encodes integers, bytes, str, bool, None, lists and dicts (definite lengths)."""
    if isinstance(value, bool):
        return b'\xf5' if value else b'\xf4'
    if value is None:
        return b'\xf6'
    if isinstance(value, int):
        return _head(0, value) if value >= 0 else _head(1, -1 - value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _head(2, len(value)) + bytes(value)
    if isinstance(value, str):
        data = value.encode()
        return _head(3, len(data)) + data
    if isinstance(value, (list, tuple)):
        return _head(4, len(value)) + b''.join(cbor_encode(v) for v in value)
    if isinstance(value, dict):
        return _head(5, len(value)) + b''.join(
            cbor_encode(k) + cbor_encode(v) for k, v in value.items()
        )
    raise TypeError(f'cannot CBOR-encode {type(value).__name__}')


class _Decoder:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise ValueError('CBOR item cut short')
        b = self.data[self.pos]
        self.pos += 1
        return b

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError('CBOR item cut short')
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def argument(self, info: int) -> int | None:
        """The head's argument; None for an indefinite length."""
        if info < 24:
            return info
        if info == 31:
            return None
        sizes = {24: 1, 25: 2, 26: 4, 27: 8}
        if info not in sizes:
            raise ValueError(f'bad CBOR additional information {info}')
        return int.from_bytes(self.take(sizes[info]), 'big')

    def at_break(self) -> bool:
        if self.pos < len(self.data) and self.data[self.pos] == 0xFF:
            self.pos += 1
            return True
        return False

    def item(self) -> Any:
        initial = self.byte()
        major, info = initial >> 5, initial & 31
        if major == 7:
            simple = {20: False, 21: True, 22: None}
            if info in simple:
                return simple[info]
            raise ValueError(f'unsupported CBOR simple value or float ({initial:#x})')
        arg = self.argument(info)
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major in (2, 3):
            if arg is None:
                chunks = []
                while not self.at_break():
                    chunks.append(self.item())
                joined = (b'' if major == 2 else '').join(chunks)
                return joined
            raw = self.take(arg)
            return bytes(raw) if major == 2 else raw.decode()
        if major == 4:
            out = []
            while (arg is None and not self.at_break()) or (arg is not None and len(out) < arg):
                out.append(self.item())
            return out
        if major == 5:
            out_map: dict = {}
            count = 0
            while (arg is None and not self.at_break()) or (arg is not None and count < arg):
                key = self.item()
                out_map[key] = self.item()
                count += 1
            return out_map
        raise ValueError(f'unsupported CBOR major type {major} (tags)')


def cbor_decode(data: bytes) -> Any:
    """Decodes one CBOR item that must fill `data` exactly."""
    decoder = _Decoder(bytes(data))
    value = decoder.item()
    if decoder.pos != len(decoder.data):
        raise ValueError(f'{len(decoder.data) - decoder.pos} bytes after the CBOR item')
    return value


# --- MCUboot images -----------------------------------------------------------------------------

IMAGE_MAGIC = 0x96F3B83D
TLV_INFO_MAGIC = 0x6907
TLV_SHA256 = 0x10


def parse_version(text: str) -> tuple[int, int, int, int]:
    """`MAJOR.MINOR.REVISION[+BUILD]` (imgtool's form) into its four numbers."""
    main, _, build = text.partition('+')
    parts = [int(p) for p in main.split('.')]
    while len(parts) < 3:
        parts.append(0)
    major, minor, revision = parts[:3]
    return major, minor, revision, int(build or 0)


def mcuboot_image(version: str, payload: bytes) -> tuple[bytes, bytes]:
    """An unsigned MCUboot image (32-byte header, payload, TLV area with the SHA-256 TLV) and
    its hash, which is what `image state read` reports for it."""
    major, minor, revision, build = parse_version(version)
    header = struct.pack(
        '<IIHHIIBBHII',
        IMAGE_MAGIC,
        0,  # load address
        32,  # header size
        0,  # protected TLV size
        len(payload),
        0,  # flags
        major,
        minor,
        revision,
        build,
        0,  # padding
    )
    digest = hashlib.sha256(header + payload).digest()
    tlvs = struct.pack('<HH', TLV_INFO_MAGIC, 4 + 4 + 32) + struct.pack('<HH', TLV_SHA256, 32)
    return header + payload + tlvs + digest, digest
