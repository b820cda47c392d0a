#!/usr/bin/env python3
"""check_sim.py: a Bluetooth LE SMP central written with Bumble's own host stack, to check the
BLE simulator (ble_sim.py) without the gateway, and to serve as the reference BLE SMP uploader
that the gateway's throughput is measured against.

What it is: a Bumble `Device` central on controller C0 of a running simulator, reached the way
the gateway reaches it (HCI H4 over `tcp-client:HOST:PORT`), or on a simulator it starts
itself (`--leaf-sim PATH`). It scans for the peripheral, connects, exchanges the ATT MTU,
discovers the SMP service, subscribes to the SMP characteristic and reads the image state
(group 1, command 0). With `--upload-size N` (or `--image FILE`) it also uploads an image with
SMP image upload requests (group 1, command 1), one request in flight, and reports bytes/s;
with `--flash` it then tests the image, resets the device, reconnects (subscribing again: a
new connection starts unsubscribed), checks that slot 0 runs the new version and confirms it.
The last stdout line is `result {JSON}` (see README.md).

What it is not: not the gateway's uploader (otagw's smp family is), not an mcumgr client for
real devices (no retries, no SMP v1 fallback, no pairing), and it checks the simulator's
behaviour only as far as a central can see it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from bumble import hci
from bumble.core import AdvertisingData, UUID
from bumble.device import Device, Peer
from bumble.transport import open_transport

import smp_codec

SMP_SERVICE_UUID = '8D53DC1D-1DB7-4CD3-868B-8A527460AA84'
SMP_CHARACTERISTIC_UUID = 'DA2E7828-FBCE-4E01-AE9E-261174997C48'
CENTRAL_ADDRESS = 'F0:00:00:00:C0:01'  # random static

HERE = Path(__file__).resolve().parent


class Failure(Exception):
    """The simulator did not behave as a central expects."""


class Disconnected(Failure):
    """The link went while a request waited for its answer."""


class SmpLink:
    """SMP over one GATT connection: requests cut into writes without response of at most
    (MTU - 3) bytes, answers reassembled from notifications by the header's length."""

    def __init__(
        self, peer: Peer, characteristic: Any, mtu: int, disconnected: asyncio.Event
    ) -> None:
        self.peer = peer
        self.disconnected = disconnected
        self.characteristic = characteristic
        self.mtu = mtu
        self.seq = 0
        self.reassembler = smp_codec.Reassembler()
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()
        self.notifications = 0

    def on_notification(self, value: bytes) -> None:
        self.notifications += 1
        for answer in self.reassembler.feed(bytes(value)):
            self.answers.put_nowait(answer)

    async def send(self, packet: bytes) -> None:
        size = self.mtu - 3
        for offset in range(0, len(packet), size):
            await self.characteristic.write_value(
                packet[offset : offset + size], with_response=False
            )

    async def call(
        self, op: int, group: int, cmd: int, body: dict | None = None, timeout: float = 10.0
    ) -> dict:
        self.seq = (self.seq + 1) & 0xFF
        await self.send(smp_codec.packet(op, group, cmd, self.seq, body))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f'no answer to ({group}, {cmd}) seq {self.seq} in {timeout} s')
            if self.disconnected.is_set():
                raise Disconnected(f'the link went before the answer to ({group}, {cmd})')
            get = asyncio.ensure_future(self.answers.get())
            gone = asyncio.ensure_future(self.disconnected.wait())
            done, _ = await asyncio.wait(
                {get, gone}, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            gone.cancel()
            if get not in done:
                get.cancel()
                continue
            answer = get.result()
            header, decoded = smp_codec.split(answer)
            if header.seq != self.seq:
                continue  # a stale answer
            if (header.op, header.group, header.id) != (op | 1, group, cmd):
                raise Failure(f'answer {header} to ({op}, {group}, {cmd})')
            return decoded


class Central:
    """The Bumble central on C0."""

    def __init__(self, hci_spec: str, target: str, mtu: int) -> None:
        self.hci_spec = hci_spec
        self.target = hci.Address(target, hci.Address.RANDOM_DEVICE_ADDRESS)
        self.mtu = mtu
        self.transport: Any = None
        self.device: Device | None = None
        self.connection: Any = None
        self.disconnected: asyncio.Event = asyncio.Event()

    async def open(self) -> None:
        self.transport = await open_transport(self.hci_spec)
        self.device = Device.with_hci(
            'check-central',
            hci.Address(CENTRAL_ADDRESS, hci.Address.RANDOM_DEVICE_ADDRESS),
            self.transport.source,
            self.transport.sink,
        )
        await self.device.power_on()

    async def scan(self, timeout: float) -> dict:
        """Waits for the target's advertisement; returns what it carries."""
        assert self.device is not None
        found: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_advertisement(advertisement: Any) -> None:
            if advertisement.address == self.target and not found.done():
                found.set_result(advertisement)

        self.device.on('advertisement', on_advertisement)
        await self.device.start_scanning(filter_duplicates=True)
        try:
            advertisement = await asyncio.wait_for(found, timeout)
        except asyncio.TimeoutError as error:
            raise Failure(f'{self.target} not seen advertising within {timeout} s') from error
        finally:
            self.device.remove_listener('advertisement', on_advertisement)
            await self.device.stop_scanning()
        data = advertisement.data
        name = data.get(AdvertisingData.COMPLETE_LOCAL_NAME) or data.get(
            AdvertisingData.SHORTENED_LOCAL_NAME
        )
        uuids = data.get(AdvertisingData.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS) or []
        return {
            'name': name,
            'services': [str(u) for u in uuids],
            'rssi': advertisement.rssi,
            'connectable': advertisement.is_connectable,
        }

    async def connect(self, timeout: float) -> SmpLink:
        """Connects, exchanges the MTU, discovers the SMP characteristic and subscribes."""
        assert self.device is not None
        self.disconnected = asyncio.Event()
        try:
            self.connection = await self.device.connect(
                self.target,
                own_address_type=hci.OwnAddressType.RANDOM,
                timeout=timeout,
            )
        except Exception as error:
            raise Failure(f'connecting to {self.target}: {error!r}') from error
        self.connection.on('disconnection', lambda reason: self.disconnected.set())
        peer = Peer(self.connection)
        mtu = await peer.request_mtu(self.mtu)
        services = await peer.discover_service(UUID(SMP_SERVICE_UUID))
        if not services:
            raise Failure('no SMP service')
        await services[0].discover_characteristics()
        characteristics = services[0].get_characteristics_by_uuid(UUID(SMP_CHARACTERISTIC_UUID))
        if not characteristics:
            raise Failure('no SMP characteristic')
        link = SmpLink(peer, characteristics[0], mtu, self.disconnected)
        await characteristics[0].subscribe(link.on_notification)
        return link

    async def wait_disconnected(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.disconnected.wait(), timeout)
        except asyncio.TimeoutError as error:
            raise Failure(f'the peripheral did not drop the link within {timeout} s') from error

    async def close(self) -> None:
        if self.transport is not None:
            await self.transport.close()


def slot(state: dict, number: int) -> dict | None:
    for image in state.get('images', []):
        if image.get('slot') == number:
            return image
    return None


def describe(image: dict | None) -> str:
    if image is None:
        return '(empty)'
    flags = [k for k in ('active', 'confirmed', 'pending', 'permanent', 'bootable') if image.get(k)]
    digest = image.get('hash', b'').hex()[:16]
    return f'version {image.get("version")} hash {digest}... {",".join(flags)}'


def upload_request(image: bytes, off: int, data_len: int) -> dict:
    data = image[off : off + data_len]
    if off == 0:
        return {
            'image': 0,
            'len': len(image),
            'off': 0,
            'sha': hashlib.sha256(image).digest(),
            'data': data,
        }
    return {'off': off, 'data': data}


def chunk_for(image: bytes, off: int, budget: int) -> int:
    """The most image bytes at `off` whose upload request packet fits in `budget` bytes."""
    n = max(budget - 64, 1)
    while n > 1:
        size = len(smp_codec.packet(2, 1, 1, 0, upload_request(image, off, n)))
        if size <= budget:
            return n
        n -= size - budget
    return 1


async def upload(link: SmpLink, image: bytes, budget: int, stats: dict) -> None:
    """Uploads `image`, one request in flight, following the offsets the device answers. It
    starts at offset 0 with the image's length and SHA-256: a device that holds part of the
    same upload answers where it stands, and the upload resumes there."""
    off = 0
    while off < len(image):
        n = chunk_for(image, off, budget)
        body = upload_request(image, off, n)
        stats['request_bytes'] += len(smp_codec.packet(2, 1, 1, 0, body))
        answer = await link.call(
            smp_codec.OP_WRITE, smp_codec.GROUP_IMAGE, smp_codec.IMG_UPLOAD, body
        )
        stats['requests'] += 1
        if answer.get('rc'):
            raise Failure(f'upload at {off}: rc {answer["rc"]}')
        if off == 0 and answer['off'] > n:
            stats['resumed_at'].append(answer['off'])
        off = answer['off']


async def check(args: argparse.Namespace, hci_spec: str, address: str) -> dict:
    result: dict[str, Any] = {'address': address}
    central = Central(hci_spec, address, args.mtu)
    try:
        await central.open()
        advertisement = await central.scan(args.timeout)
        print(f'advertising: {advertisement}')
        if SMP_SERVICE_UUID.lower() not in [s.lower() for s in advertisement['services']]:
            raise Failure(f'the advertisement lacks the SMP service: {advertisement}')
        result['advertisement'] = advertisement
        link = await central.connect(args.timeout)
        print(f'connected: ATT MTU {link.mtu}, subscribed')
        result['mtu'] = link.mtu
        state = await link.call(smp_codec.OP_READ, smp_codec.GROUP_IMAGE, smp_codec.IMG_STATE)
        print(f'image state: slot 0 {describe(slot(state, 0))}; slot 1 {describe(slot(state, 1))}')
        result['slot0_version'] = (slot(state, 0) or {}).get('version')

        image = None
        if args.image:
            image = Path(args.image).read_bytes()
        elif args.upload_size:
            payload = bytes((i * 31 + 7) % 251 for i in range(args.upload_size))
            image, _ = smp_codec.mcuboot_image(args.version, payload)
        if image is None:
            return result
        budget = args.packet_size or (link.mtu - 3)
        stats: dict[str, Any] = {
            'bytes': len(image),
            'requests': 0,
            'request_bytes': 0,
            'packet_budget': budget,
            'reconnects': 0,
            'resumed_at': [],
        }
        started = time.monotonic()
        while True:
            try:
                await upload(link, image, budget, stats)
                break
            except Disconnected:
                if stats['reconnects'] >= args.max_reconnects:
                    raise
                stats['reconnects'] += 1
                print('the link went mid-upload: reconnecting to resume')
                await central.scan(args.timeout)
                link = await central.connect(args.timeout)
        seconds = time.monotonic() - started
        stats['seconds'] = round(seconds, 4)
        stats['bytes_per_s'] = round(len(image) / seconds)
        print(
            f'uploaded {stats["bytes"]} bytes in {stats["seconds"]} s: {stats["bytes_per_s"]} '
            f'bytes/s ({stats["requests"]} requests of at most {budget} bytes)'
        )
        result['upload'] = stats
        state = await link.call(smp_codec.OP_READ, smp_codec.GROUP_IMAGE, smp_codec.IMG_STATE)
        new = slot(state, 1)
        print(f'slot 1: {describe(new)}')
        if not args.flash:
            return result
        if new is None:
            raise Failure('slot 1 is empty after the upload')
        await link.call(
            smp_codec.OP_WRITE,
            smp_codec.GROUP_IMAGE,
            smp_codec.IMG_STATE,
            {'hash': new['hash'], 'confirm': False},
        )
        await link.call(smp_codec.OP_WRITE, smp_codec.GROUP_OS, smp_codec.OS_RESET, {})
        reset_at = time.monotonic()
        await central.wait_disconnected(args.timeout)
        print('reset: the peripheral dropped the link')
        await central.scan(args.timeout)
        link = await central.connect(args.timeout)
        back = time.monotonic() - reset_at
        print(f'reconnected {back:.3f} s after the reset, subscribed again')
        state = await link.call(smp_codec.OP_READ, smp_codec.GROUP_IMAGE, smp_codec.IMG_STATE)
        running = slot(state, 0)
        print(f'image state: slot 0 {describe(running)}')
        if running is None or running.get('hash') != new['hash']:
            raise Failure('slot 0 does not run the uploaded image after the reset')
        state = await link.call(
            smp_codec.OP_WRITE, smp_codec.GROUP_IMAGE, smp_codec.IMG_STATE, {'confirm': True}
        )
        confirmed = bool((slot(state, 0) or {}).get('confirmed'))
        print(f'confirmed: {confirmed}')
        result.update(
            flashed_version=running.get('version'),
            confirmed=confirmed,
            reconnect_s=round(back, 3),
        )
        return result
    finally:
        await central.close()


async def start_simulator(args: argparse.Namespace) -> tuple[asyncio.subprocess.Process, str, str]:
    """Starts ble_sim.py with one device; returns it, its HCI spec and the device address."""
    address = 'C0:00:00:00:00:01'
    device = f'{address},name=check,reboot-ms={args.reboot_ms}'
    if args.sim_mtu:
        device += f',mtu={args.sim_mtu}'
    if args.sim_out_of_range:
        device += f',out-of-range={args.sim_out_of_range}'
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / 'ble_sim.py'),
        '--hci',
        'tcp-server:127.0.0.1:0',
        '--leaf-sim',
        args.leaf_sim,
        '--device',
        device,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
    if not line.startswith('ready '):
        raise Failure(f'the simulator said {line!r}')
    fields = dict(part.split('=', 1) for part in line.split()[1:])
    print(f'simulator: {line}')
    return process, f'tcp-client:{fields["hci"]}', fields['devices'].split(',')[0]


async def drain(process: asyncio.subprocess.Process, into: list[dict]) -> None:
    assert process.stdout is not None
    while line := await process.stdout.readline():
        into.append(json.loads(line))


async def main_async(args: argparse.Namespace) -> int:
    simulator = None
    events: list[dict] = []
    drainer = None
    if args.hci:
        hci_spec, address = args.hci, args.address
    else:
        simulator, hci_spec, address = await start_simulator(args)
        drainer = asyncio.create_task(drain(simulator, events))
    try:
        result = await check(args, hci_spec, address)
        code = 0
    except Failure as error:
        print(f'FAILED: {error}', file=sys.stderr)
        result = {'error': str(error)}
        code = 1
    finally:
        if simulator is not None:
            simulator.terminate()
            await simulator.wait()
        if drainer is not None:
            await drainer
    if simulator is not None:
        kinds: dict[str, int] = {}
        for event in events:
            kinds[event['event']] = kinds.get(event['event'], 0) + 1
        result['simulator_events'] = kinds
    print('result ' + json.dumps(result, default=lambda b: b.hex()))
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument('--hci', help='a running simulator\'s C0, e.g. tcp-client:127.0.0.1:PORT')
    where.add_argument(
        '--leaf-sim',
        default=os.environ.get('OTAGW_LEAF_SIM'),
        help='start ble_sim.py with one device, using this leaf-sim binary',
    )
    parser.add_argument(
        '--address', default='C0:00:00:00:00:01', help='the peripheral (with --hci)'
    )
    parser.add_argument('--mtu', type=int, default=247, help='ATT MTU to ask for')
    parser.add_argument('--timeout', type=float, default=10.0, help='seconds for each wait')
    parser.add_argument('--upload-size', type=int, help='upload an image with this payload size')
    parser.add_argument('--image', help='upload this image file instead')
    parser.add_argument('--version', default='2.0.0', help='version of the generated image')
    parser.add_argument(
        '--packet-size',
        type=int,
        help='largest SMP request packet (default: MTU - 3, one write per request; up to the '
        'device\'s buf_size, several writes each)',
    )
    parser.add_argument('--flash', action='store_true', help='then test, reset, reconnect, confirm')
    parser.add_argument(
        '--max-reconnects', type=int, default=3, help='reconnections to resume an upload'
    )
    parser.add_argument(
        '--reboot-ms', type=int, default=300, help='(started simulator) reboot time'
    )
    parser.add_argument('--sim-mtu', type=int, help='(started simulator) largest MTU it grants')
    parser.add_argument(
        '--sim-out-of-range',
        type=int,
        metavar='BYTES',
        help='(started simulator) the device leaves range once it holds this many upload bytes',
    )
    parser.add_argument('-v', '--verbose', action='store_true', help='Bumble\'s debug log')
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    return asyncio.run(main_async(args))


if __name__ == '__main__':
    sys.exit(main())
