#!/usr/bin/env python3
"""ble_sim.py: a Bluetooth LE test radio for otagw, with simulated MCUmgr SMP peripherals
(MCUboot behind them) on it.

What it is: ONE Python process running Google Bumble's virtual controllers on a
`bumble.link.LocalLink`. Controller C0 is exported to the gateway's host stack as an HCI H4
transport (`--hci tcp-server:127.0.0.1:PORT`, PORT 0 for an ephemeral one). Controllers
C1..Cn each carry a Bumble `Device` peripheral with a random static address that advertises
(connectable, its name and the SMP service UUID) and serves the mcumgr SMP GATT service:
characteristic DA2E7828-... with write without response and notify. Each peripheral relays
the characteristic's writes, as raw SMP bytes, into a session with its own
`leaf-sim smp --raw-tcp` subprocess (examples/leaf-sim: the Rust SMP device with MCUboot slot
semantics, the same one the serial tests use), and sends its answers back as notifications of
at most (ATT MTU - 3) bytes. When the SMP device resets, the peripheral drops the link, waits
out the reboot time and advertises again; the leaf-sim process keeps its slots.

It prints one line `ready hci=HOST:PORT devices=ADDR,ADDR,...` on stdout when everything
advertises, then one JSON object per line for each event (see README.md).

What it is not: not an SMP implementation (every SMP byte comes from the leaf-sim), not a
model of radio timing (the LocalLink delivers at once; throughput is bounded by this process's
CPU), and no security (no pairing, no encryption). It patches some of Bumble's controller
behaviour where a real controller differs and a gateway would notice (HCI_Reset keeps links,
a cancelled LE Create Connection never completes, ACL data is routed by the sender's random
address, scan reports ignore which scan commands the host used, whole ACL packets to the host,
a peripheral's connection interval is a constant); README.md lists each patch.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from bumble import core, hci, ll
from bumble.controller import Controller
from bumble.core import AdvertisingData, PhysicalTransport
from bumble.device import Connection, Device
from bumble.gatt import Characteristic, CharacteristicValue, Service
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport import open_transport
from bumble.transport.common import AsyncPipeSink, PacketParser

import smp_codec
from smp_codec import Header

SMP_SERVICE_UUID = '8D53DC1D-1DB7-4CD3-868B-8A527460AA84'
SMP_CHARACTERISTIC_UUID = 'DA2E7828-FBCE-4E01-AE9E-261174997C48'

# HCI error codes used here.
CONNECTION_TIMEOUT = 0x08
UNKNOWN_CONNECTION_IDENTIFIER = 0x02
COMMAND_DISALLOWED = 0x0C

# Legacy advertising data is at most 31 bytes: flags (3) + one 128-bit UUID (18) leave 10.
LEGACY_AD_SIZE = 31

logger = logging.getLogger('ble_sim')


# --- the event log ------------------------------------------------------------------------------


class EventLog:
    """One JSON object per line on stdout, each with `t` (seconds since the start) and
    `event`. Events before the ready line are held back and printed right after it, so the
    ready line is always the first line."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.held: list[str] | None = []

    def emit(self, event: str, **fields: Any) -> None:
        record = {'t': round(time.monotonic() - self.t0, 4), 'event': event, **fields}
        line = json.dumps(record, separators=(',', ':'))
        if self.held is not None:
            self.held.append(line)
        else:
            print(line, flush=True)

    def ready(self, line: str) -> None:
        print(line, flush=True)
        for held in self.held or []:
            print(held, flush=True)
        self.held = None


# --- Bumble's link and controller, patched -------------------------------------------------------


class SimLink(LocalLink):
    """A LocalLink that routes LE data by the connection's own address.

    Bumble's LocalLink tags LE data with the sender controller's *random* address, and the
    receiver looks the connection up by that; a central that connects with its public address
    (or with none set) would see no data flow. A real radio carries data on the connection,
    whatever address it was made with."""

    def send_acl_data(
        self,
        sender_controller: Controller,
        destination_address: hci.Address,
        transport: PhysicalTransport,
        data: bytes,
    ) -> None:
        if transport == PhysicalTransport.LE:
            connection = sender_controller.le_connections.get(destination_address)
            destination = self.find_le_controller(destination_address)
            if connection is not None and destination is not None:
                source = connection.self_address
                asyncio.get_running_loop().call_soon(
                    destination.on_link_acl_data, source, transport, data
                )
                return
        super().send_acl_data(sender_controller, destination_address, transport, data)


class SimController(Controller):
    """Bumble's virtual controller with the behaviour of a real one where a gateway's host
    stack would notice the difference (see README.md, "Patches to Bumble")."""

    def __init__(
        self,
        name: str,
        *,
        link: LocalLink,
        public_address: str | None = None,
        fragment_acl: bool = False,
        log: Callable[..., None] | None = None,
    ) -> None:
        super().__init__(name, link=link, public_address=public_address)
        self.fragment_acl = fragment_acl
        self.log = log
        self.legacy_scan = False
        self._connect_ind: ll.ConnectInd | None = None

    def _emit(self, event: str, **fields: Any) -> None:
        if self.log is not None:
            self.log(event, **fields)

    # HCI_Reset: Bumble answers it and keeps everything. A real controller drops its links
    # (the peers notice a supervision timeout), forgets a pending connection, stops scanning
    # and advertising. A gateway that restarts mid-connection relies on that.
    def on_hci_reset_command(self, command: hci.HCI_Reset_Command) -> Any:
        dropped = []
        for connection in list(self.le_connections.values()):
            connection.send_ll_control_pdu(ll.TerminateInd(CONNECTION_TIMEOUT))
            del self.le_connections[connection.peer_address]
            dropped.append(connection.peer_address.to_string(False))
        pending = self.pending_le_connection is not None
        self.pending_le_connection = None
        self.le_scan_enable = False
        self.legacy_scan = False
        self.le_legacy_advertiser.stop()
        for advertising_set in self.advertising_sets.values():
            advertising_set.stop()
        self.advertising_sets.clear()
        self._emit('hci_reset', links_dropped=dropped, pending_connection_dropped=pending)
        return super().on_hci_reset_command(command)

    # LE Create Connection Cancel: Bumble answers success and the connection attempt stays
    # pending forever (no LE Connection Complete). A real controller answers Command
    # Disallowed when nothing is pending; otherwise it completes the attempt with Unknown
    # Connection Identifier after the Command Complete.
    def on_hci_le_create_connection_cancel_command(
        self, command: hci.HCI_LE_Create_Connection_Cancel_Command
    ) -> Any:
        pending = self.pending_le_connection
        if pending is None:
            return hci.HCI_StatusReturnParameters(COMMAND_DISALLOWED)
        self.pending_le_connection = None
        cancelled = hci.HCI_LE_Connection_Complete_Event(
            status=UNKNOWN_CONNECTION_IDENTIFIER,
            connection_handle=0,
            role=hci.Role.CENTRAL,
            peer_address_type=pending.peer_address.address_type,
            peer_address=pending.peer_address,
            connection_interval=0,
            peripheral_latency=0,
            supervision_timeout=0,
            central_clock_accuracy=0,
        )
        # The Command Complete is queued when this returns: the event must follow it.
        asyncio.get_running_loop().call_soon(self.send_hci_packet, cancelled)
        self._emit('connect_cancelled', peer=pending.peer_address.to_string(False))
        return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.SUCCESS)

    # ACL data to the host: Bumble hands over each L2CAP PDU whole. A real controller cuts it
    # to its buffer size (the LE ACL data length it reports), with continuation fragments.
    def on_link_acl_data(
        self, sender_address: hci.Address, transport: PhysicalTransport, data: bytes
    ) -> None:
        size = self.le_acl_data_packet_length
        if not self.fragment_acl or transport != PhysicalTransport.LE or len(data) <= size:
            super().on_link_acl_data(sender_address, transport, data)
            return
        connection = self.le_connections.get(sender_address)
        if connection is None:
            logger.warning('ACL data from %s without a connection', sender_address)
            return
        for offset in range(0, len(data), size):
            fragment = data[offset : offset + size]
            pb_flag = 2 if offset == 0 else 1  # first (automatically flushable), continuing
            self.send_hci_packet(
                hci.HCI_AclDataPacket(connection.handle, pb_flag, 0, len(fragment), fragment)
            )

    # Scan reports: Bumble sends extended advertising reports whenever the controller supports
    # extended advertising, even to a host that scans with the legacy commands (and may not
    # have unmasked those events). A real controller answers legacy scanning with legacy
    # reports.
    def on_hci_le_set_scan_enable_command(self, command: Any) -> Any:
        self.legacy_scan = bool(command.le_scan_enable)
        return super().on_hci_le_set_scan_enable_command(command)

    def on_hci_le_set_extended_scan_enable_command(self, command: Any) -> Any:
        self.legacy_scan = False
        return super().on_hci_le_set_extended_scan_enable_command(command)

    def on_advertising_pdu(self, pdu: Any) -> None:
        if not self.legacy_scan:
            super().on_advertising_pdu(pdu)
            return
        features = self.le_features
        self.le_features = features & ~hci.LeFeatureMask.LE_EXTENDED_ADVERTISING
        try:
            super().on_advertising_pdu(pdu)
        finally:
            self.le_features = features

    # A peripheral's LE Connection Complete: Bumble reports a constant interval (12.5 ms) and
    # supervision timeout. Report what the central asked for in its CONNECT_IND.
    def on_le_connect_ind(self, packet: ll.ConnectInd) -> None:
        self._connect_ind = packet
        try:
            super().on_le_connect_ind(packet)
        finally:
            self._connect_ind = None

    def send_hci_packet(self, packet: hci.HCI_Packet) -> None:
        ind = self._connect_ind
        if (
            ind is not None
            and isinstance(packet, hci.HCI_LE_Connection_Complete_Event)
            and packet.role == hci.Role.PERIPHERAL
        ):
            packet = hci.HCI_LE_Connection_Complete_Event(
                status=packet.status,
                connection_handle=packet.connection_handle,
                role=packet.role,
                peer_address_type=packet.peer_address_type,
                peer_address=packet.peer_address,
                connection_interval=ind.interval,
                peripheral_latency=ind.latency,
                supervision_timeout=ind.timeout,
                central_clock_accuracy=packet.central_clock_accuracy,
            )
        super().send_hci_packet(packet)

    def drop_link(self, handle: int, reason: int = CONNECTION_TIMEOUT) -> bool:
        """Ends an LE link as the radio losing it does: both hosts get a Disconnection
        Complete with `reason` (a supervision timeout by default). False: no such link."""
        connection = self.find_le_connection_by_handle(handle)
        if connection is None:
            return False
        connection.send_ll_control_pdu(ll.TerminateInd(reason))
        self.on_le_disconnected(connection, reason)
        return True


# --- C0 on TCP ------------------------------------------------------------------------------------


class H4Server:
    """Exports a controller as HCI H4 on a TCP port, like a UART controller behind ser2net.

    One client at a time: a new client takes over and the older one is closed (ser2net's
    `kickolduser`). Each client starts with a fresh H4 parser (Bumble's own tcp-server
    transport keeps a half-parsed packet across clients). A byte stream that is not H4 closes
    the client. The controller's links outlive clients, as a real controller's outlive the
    host process until the next HCI_Reset."""

    def __init__(self, controller: Controller, log: Callable[..., None]) -> None:
        self.controller = controller
        self.log = log
        self.client: asyncio.Transport | None = None
        self.server: asyncio.base_events.Server | None = None
        controller.host = self

    # The controller's host sink: packets to whichever client is connected (none: lost, as on
    # a UART nobody listens to).
    def on_packet(self, packet: bytes) -> None:
        if self.client is not None and not self.client.is_closing():
            self.client.write(packet)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        server_self = self

        class Protocol(asyncio.Protocol):
            def __init__(self) -> None:
                self.transport: asyncio.Transport | None = None
                self.parser = PacketParser(server_self.controller)
                self.peer = '?'

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.Transport)
                self.transport = transport
                peer = transport.get_extra_info('peername')
                self.peer = f'{peer[0]}:{peer[1]}' if peer else '?'
                old = server_self.client
                server_self.client = transport
                if old is not None and not old.is_closing():
                    old.close()
                    server_self.log('hci_client_replaced')
                transport.set_write_buffer_limits(high=1 << 20)
                server_self.log('hci_connected', peer=self.peer)

            def data_received(self, data: bytes) -> None:
                try:
                    self.parser.feed_data(data)
                except core.InvalidPacketError as error:
                    server_self.log('hci_desync', peer=self.peer, error=str(error))
                    if self.transport is not None:
                        self.transport.close()

            def connection_lost(self, exc: Exception | None) -> None:
                if server_self.client is self.transport:
                    server_self.client = None
                server_self.log('hci_disconnected', peer=self.peer)

        self.server = await asyncio.get_running_loop().create_server(Protocol, host, port)
        bound = self.server.sockets[0].getsockname()
        return bound[0], bound[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.client is not None:
            self.client.close()


# --- device specifications -----------------------------------------------------------------------


@dataclass
class DeviceSpec:
    """One simulated peripheral, from `--device ADDR[,key=value|flag]...`."""

    address: str
    name: str
    version: str = '1.0.0'
    leaf_faults: list[str] = field(default_factory=list)
    out_of_range: int | None = None
    out_of_range_ms: int = 1000
    no_return: bool = False
    reboot_ms: int = 300
    mtu: int = 252
    slot0: str | None = None
    keep_upload: bool = False
    buf_size: int | None = None

    KEYS = (
        'name, version, fault (repeatable: a leaf-sim fault), out-of-range (bytes), '
        'out-of-range-ms, no-return, reboot-ms, mtu, slot0 (path), keep-upload, buf-size'
    )

    @classmethod
    def parse(cls, text: str, index: int, defaults: argparse.Namespace) -> DeviceSpec:
        address, *options = [part.strip() for part in text.split(',')]
        address = address.upper().removesuffix('/R')
        parsed = hci.Address(address, hci.Address.RANDOM_DEVICE_ADDRESS)
        if not parsed.is_static:
            raise ValueError(
                f'{address}: not a random static address (the two top bits must be 11, '
                'e.g. C0:00:00:00:00:01); Bumble\'s LocalLink routes by random address'
            )
        spec = cls(
            address=parsed.to_string(False),
            name=f'leaf{index}',
            reboot_ms=defaults.reboot_ms,
            mtu=defaults.mtu,
            out_of_range_ms=defaults.out_of_range_ms,
        )
        for option in options:
            if not option:
                continue
            key, has_value, value = option.partition('=')
            key = key.strip().replace('_', '-')
            flag = not has_value

            def number() -> int:
                if flag or not value.strip().isdigit():
                    raise ValueError(f'{address}: `{option}` needs a number')
                return int(value)

            if key == 'name' and not flag:
                spec.name = value
            elif key == 'version' and not flag:
                smp_codec.parse_version(value)
                spec.version = value
            elif key == 'fault' and not flag:
                spec.leaf_faults.append(value)
            elif key == 'out-of-range':
                spec.out_of_range = number()
            elif key == 'out-of-range-ms':
                spec.out_of_range_ms = number()
            elif key == 'no-return' and flag:
                spec.no_return = True
            elif key == 'reboot-ms':
                spec.reboot_ms = number()
            elif key == 'mtu':
                spec.mtu = number()
                if spec.mtu < 23:
                    raise ValueError(f'{address}: the ATT MTU is at least 23')
            elif key == 'slot0' and not flag:
                spec.slot0 = value
            elif key == 'keep-upload' and flag:
                spec.keep_upload = True
            elif key == 'buf-size':
                spec.buf_size = number()
            else:
                raise ValueError(f'{address}: unknown option `{option}` (keys: {cls.KEYS})')
        return spec


# Looked up before any fork: the child only calls it.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a leaf-sim child, before exec: a SIGTERM when this simulator dies, however it dies
    (Linux's PR_SET_PDEATHSIG), so that no leaf-sim outlives it."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def advertising_data(name: str) -> tuple[bytes, bytes]:
    """Connectable advertising data with the flags, the SMP service UUID and the name (the
    complete name when it fits in 31 bytes, else a shortened one), and a scan response with
    the complete name."""
    uuid = bytes(core.UUID(SMP_SERVICE_UUID))
    encoded = name.encode()
    room = LEGACY_AD_SIZE - 3 - (2 + len(uuid)) - 2
    if len(encoded) <= room:
        name_field = (AdvertisingData.COMPLETE_LOCAL_NAME, encoded)
    else:
        name_field = (AdvertisingData.SHORTENED_LOCAL_NAME, encoded[:room])
    data = AdvertisingData(
        [
            (AdvertisingData.FLAGS, bytes([0x06])),  # LE general discoverable, no BR/EDR
            (AdvertisingData.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS, uuid),
            name_field,
        ]
    )
    scan = AdvertisingData([(AdvertisingData.COMPLETE_LOCAL_NAME, encoded[:29])])
    return bytes(data), bytes(scan)


# --- the relay ------------------------------------------------------------------------------------


class Session:
    """One BLE connection's raw SMP session with the leaf-sim: a TCP connection that carries
    the characteristic's writes in and the device's answers out. The leaf-sim ends it (end of
    file) when the device resets."""

    def __init__(self, peripheral: Peripheral, connection: Connection) -> None:
        self.peripheral = peripheral
        self.connection = connection
        self.writer: asyncio.StreamWriter | None = None
        self.pending = bytearray()
        self.closing = False
        self.requests = smp_codec.Reassembler()
        peripheral.spawn(self.run())

    def write(self, data: bytes) -> None:
        """Relays one ATT write (in order; never blocks)."""
        if self.closing:
            return
        if self.writer is None:
            self.pending.extend(data)
        else:
            self.writer.write(data)
        for request in self.requests.feed(data):
            self.peripheral.on_request(request)

    async def run(self) -> None:
        try:
            await self.relay()
        except Exception as error:  # the relay's last resort: say so, drop the link
            logger.exception('relay of %s', self.peripheral.spec.address)
            self.peripheral.log('relay_error', error=repr(error))
            self.peripheral.drop('relay_error')

    async def relay(self) -> None:
        host, port = self.peripheral.leaf_address
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as error:
            self.peripheral.log('relay_error', error=f'connecting to the leaf-sim: {error}')
            self.peripheral.drop('relay_error')
            return
        if self.closing:
            writer.close()
            return
        self.writer = writer
        writer.write(bytes(self.pending))
        self.pending.clear()
        answers = smp_codec.Reassembler()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for answer in answers.feed(data):
                    await self.peripheral.on_answer(self, answer)
        except ConnectionError:
            pass
        if not self.closing:
            # The leaf-sim ended the session: the SMP device reset (or the leaf-sim died).
            self.peripheral.on_session_ended()
        writer.close()

    def close(self) -> None:
        """Ends the session from this side (the BLE link went)."""
        self.closing = True
        if self.writer is not None:
            self.writer.close()


class Peripheral:
    """One simulated BLE peripheral: controller C<index> on the link, a Bumble Device with the
    SMP GATT service, and its leaf-sim subprocess."""

    def __init__(
        self,
        index: int,
        spec: DeviceSpec,
        link: LocalLink,
        leaf_sim: str,
        events: EventLog,
        adv_interval_ms: float,
        leaf_log: str,
    ) -> None:
        self.index = index
        self.spec = spec
        self.link = link
        self.leaf_sim = leaf_sim
        self.events = events
        self.adv_interval_ms = adv_interval_ms
        self.leaf_log = leaf_log
        self.leaf_address: tuple[str, int] = ('127.0.0.1', 0)
        self.process: asyncio.subprocess.Process | None = None
        self.controller: SimController | None = None
        self.device: Device | None = None
        self.characteristic: Characteristic | None = None
        self.connection: Connection | None = None
        self.session: Session | None = None
        self.subscribed = False
        self.drop_reason: str | None = None
        self.out_of_range_fired = False
        # Resets and boots as the leaf-sim's event lines report them, and sessions the
        # leaf-sim ended (its reset, seen on the session's own stream).
        self.resets = 0
        self.boots = 0
        self.session_resets = 0
        self.changed = asyncio.Event()
        self.gone = False
        self.dead = False
        self.stopping = False
        self.advertising = False
        self.tasks: set[asyncio.Task] = set()

    def log(self, event: str, **fields: Any) -> None:
        self.events.emit(event, device=self.spec.address, **fields)

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- the leaf-sim --

    async def start_leaf(self) -> None:
        spec = self.spec
        args = ['smp', '--raw-tcp', '127.0.0.1:0', '--json-events']
        args += ['--version', spec.version, '--boot-ms', str(spec.reboot_ms)]
        for fault in spec.leaf_faults:
            args += ['--fault', fault]
        if spec.slot0:
            args += ['--slot0-out', spec.slot0]
        if spec.keep_upload:
            args.append('--keep-upload')
        if spec.buf_size is not None:
            args += ['--buf-size', str(spec.buf_size)]
        env = dict(os.environ)
        env.setdefault('RUST_LOG', self.leaf_log)
        self.process = await asyncio.create_subprocess_exec(
            self.leaf_sim,
            *args,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            preexec_fn=die_with_parent,
        )
        assert self.process.stdout is not None
        first = (await self.process.stdout.readline()).decode().strip()
        if not first.startswith('raw-tcp: '):
            code = await self.process.wait()
            raise RuntimeError(
                f'{spec.address}: leaf-sim printed {first!r} and exited with {code} '
                f'(arguments: {" ".join(args)})'
            )
        host, _, port = first.removeprefix('raw-tcp: ').rpartition(':')
        self.leaf_address = (host, int(port))
        self.spawn(self.read_leaf_events())

    async def read_leaf_events(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while line := await self.process.stdout.readline():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                logger.warning('%s: leaf-sim line %r', self.spec.address, line)
                continue
            name = event.pop('event', '?')
            if name == 'request':
                continue  # the relay logs requests itself
            self.log(name, **event)
            if name == 'reset':
                self.resets += 1
                self.going()
            elif name == 'booted':
                self.boots += 1
            self.changed.set()
        code = await self.process.wait()
        self.dead = True
        self.changed.set()
        if not self.stopping:
            self.log('leaf_exit', code=code)
            self.drop('leaf_exit')
            await self.stop_advertising()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Waits until `condition()` holds after a leaf-sim event (or the leaf-sim died)."""
        while not self.dead and not condition():
            self.changed.clear()
            await self.changed.wait()

    async def wait_booted(self) -> None:
        """Waits until the device has booted after every reset seen so far."""
        await self.wait_until(lambda: self.boots >= max(self.resets, self.session_resets))

    # -- the peripheral --

    async def start(self) -> None:
        await self.start_leaf()
        self.controller = SimController(f'C{self.index}', link=self.link)
        address = hci.Address(self.spec.address, hci.Address.RANDOM_DEVICE_ADDRESS)
        host = Host(self.controller, AsyncPipeSink(self.controller))
        self.device = Device(name=self.spec.name, address=address, host=host)
        self.device.gatt_server.max_mtu = self.spec.mtu
        self.characteristic = Characteristic(
            SMP_CHARACTERISTIC_UUID,
            Characteristic.Properties.WRITE_WITHOUT_RESPONSE | Characteristic.Properties.NOTIFY,
            Characteristic.WRITEABLE,
            CharacteristicValue(write=self.on_write),
        )
        self.device.add_service(Service(SMP_SERVICE_UUID, [self.characteristic]))
        self.device.on('connection', self.on_connection)
        self.device.on('characteristic_subscription', self.on_subscription)
        await self.device.power_on()
        await self.advertise()

    async def advertise(self) -> None:
        if self.gone or self.dead or self.connection is not None or self.device is None:
            return
        data, scan = advertising_data(self.spec.name)
        await self.device.start_advertising(
            advertising_data=data,
            scan_response_data=scan,
            advertising_interval_min=self.adv_interval_ms,
            advertising_interval_max=self.adv_interval_ms,
        )
        self.advertising = True
        self.log('advertising', name=self.spec.name)

    async def stop_advertising(self) -> None:
        if self.advertising and self.device is not None:
            self.advertising = False
            await self.device.stop_advertising()

    def on_connection(self, connection: Connection) -> None:
        self.advertising = False  # the controller stops advertising at a connection
        self.connection = connection
        self.subscribed = False
        self.drop_reason = None
        self.session = Session(self, connection)
        connection.on('disconnection', lambda reason: self.on_disconnection(connection, reason))
        connection.on('connection_att_mtu_update', lambda: self.on_mtu(connection))
        self.log(
            'connect',
            peer=connection.peer_address.to_string(False),
            interval_ms=connection.parameters.connection_interval,
        )

    def on_mtu(self, connection: Connection) -> None:
        self.log('mtu', mtu=connection.att_mtu)

    def on_subscription(
        self, connection: Any, characteristic: Any, notify: bool, indicate: bool
    ) -> None:
        if characteristic is self.characteristic:
            self.subscribed = bool(notify)
            self.log('subscribe', notify=bool(notify))

    def on_write(self, connection: Connection, value: bytes) -> None:
        # Synchronous on purpose: Bumble runs each ATT write in its own task, and a write
        # handler that never awaits keeps them in the order they came.
        if self.session is not None and connection is self.connection:
            self.session.write(bytes(value))

    def on_request(self, request: bytes) -> None:
        header = Header.parse(request)
        if (header.group, header.id) == (smp_codec.GROUP_IMAGE, smp_codec.IMG_UPLOAD):
            return  # uploads are logged by their answers' offsets
        self.log('request', op=header.op, group=header.group, id=header.id, seq=header.seq)

    async def on_answer(self, session: Session, answer: bytes) -> None:
        header = Header.parse(answer)
        if (header.group, header.id, header.op) == (
            smp_codec.GROUP_IMAGE,
            smp_codec.IMG_UPLOAD,
            smp_codec.OP_WRITE_RSP,
        ):
            try:
                _, body = smp_codec.split(answer)
            except ValueError:
                body = {}
            off, rc = body.get('off'), body.get('rc')
            self.log('upload', off=off, **({'rc': rc} if rc is not None else {}))
            limit = self.spec.out_of_range
            if (
                limit is not None
                and not self.out_of_range_fired
                and isinstance(off, int)
                and off >= limit
            ):
                self.out_of_range_fired = True
                self.log('out_of_range', off=off, away_ms=self.spec.out_of_range_ms)
                self.drop('out_of_range')
                return  # the answer is lost with the link
        await self.notify(session, answer)

    async def notify(self, session: Session, answer: bytes) -> None:
        connection = session.connection
        if connection is not self.connection or self.device is None:
            return
        if not self.subscribed:
            # Zephyr's SMP transport drops an answer nobody subscribed to.
            header = Header.parse(answer)
            self.log('notify_dropped', seq=header.seq, bytes=len(answer))
            return
        size = max(connection.att_mtu - 3, 20)
        for offset in range(0, len(answer), size):
            if connection is not self.connection:
                return
            await self.device.notify_subscriber(
                connection, self.characteristic, answer[offset : offset + size]
            )

    def on_session_ended(self) -> None:
        """The leaf-sim ended the session: the SMP device reset (or the leaf-sim died, which
        its `leaf_exit` event tells). The session's stream carried the last answer before its
        end, so the link drops once that answer is on its way: the leaf-sim's `reset` event
        line comes on another pipe and may be read before the answer."""
        if self.stopping:
            return
        self.session_resets += 1
        self.going()
        self.spawn(self.drop_when_sent('reset'))

    def going(self) -> None:
        """A reset happened: a `no-return` device is gone for good."""
        if self.spec.no_return and not self.gone and not self.stopping:
            self.gone = True
            self.log('gone')

    async def drop_when_sent(self, why: str) -> None:
        """Drops the link once the peripheral's host has handed all its data for it to the
        controller (and the controller to the link, which keeps the order)."""
        connection = self.connection
        if connection is None or self.device is None:
            return
        queue = self.device.host.le_acl_packet_queue or self.device.host.acl_packet_queue
        if queue is not None:
            try:
                await asyncio.wait_for(queue.drain(connection.handle), 1.0)
            except (ValueError, asyncio.TimeoutError):
                pass  # nothing was ever sent on it / the controller stalled: drop anyway
        if connection is self.connection:
            self.drop(why)

    def drop(self, why: str) -> None:
        """Drops the link as lost radio contact does (both sides see a supervision
        timeout); `why` decides what happens after (see on_disconnection)."""
        connection = self.connection
        if connection is None or self.controller is None:
            return
        if self.drop_reason is None:
            self.drop_reason = why
        self.controller.drop_link(connection.handle)

    def on_disconnection(self, connection: Connection, reason: int) -> None:
        if connection is not self.connection:
            return
        why = self.drop_reason or 'central'
        self.connection = None
        self.subscribed = False
        if self.session is not None:
            self.session.close()
            self.session = None
        self.log(
            'disconnect',
            peer=connection.peer_address.to_string(False),
            reason=f'0x{reason:02x}',
            why=why,
        )
        self.spawn(self.after_disconnection(why))

    async def after_disconnection(self, why: str) -> None:
        if why == 'out_of_range':
            await asyncio.sleep(self.spec.out_of_range_ms / 1000)
        await self.wait_booted()
        await self.advertise()

    async def stop(self) -> None:
        self.stopping = True
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
        for task in list(self.tasks):
            task.cancel()


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='A Bluetooth LE test radio with simulated MCUmgr SMP peripherals '
        '(Bumble LocalLink; controller C0 exported to the gateway as HCI H4).',
        epilog=f'--device options: {DeviceSpec.KEYS}. Example: --device '
        'C0:00:00:00:00:01,name=leaf1,version=1.0.0,fault=no-boot,out-of-range=65536',
    )
    parser.add_argument(
        '--hci',
        default='tcp-server:127.0.0.1:0',
        help='where the gateway\'s host stack reaches controller C0: tcp-server:HOST:PORT '
        '(PORT 0: ephemeral) or any Bumble transport name (e.g. pty:PATH)',
    )
    parser.add_argument(
        '--leaf-sim',
        default=os.environ.get('OTAGW_LEAF_SIM'),
        help='the leaf-sim binary of examples/leaf-sim (default: $OTAGW_LEAF_SIM)',
    )
    parser.add_argument(
        '--device',
        action='append',
        default=[],
        metavar='ADDR[,KEY=VALUE|FLAG...]',
        help='a peripheral with a random static address (repeatable)',
    )
    parser.add_argument(
        '--reboot-ms',
        type=int,
        default=300,
        help='default time from an SMP reset to advertising again (the leaf-sim\'s boot time)',
    )
    parser.add_argument(
        '--mtu', type=int, default=252, help='default largest ATT MTU a peripheral grants'
    )
    parser.add_argument(
        '--out-of-range-ms',
        type=int,
        default=1000,
        help='default time an out-of-range peripheral stays away',
    )
    parser.add_argument(
        '--adv-interval-ms', type=float, default=50.0, help='advertising interval'
    )
    parser.add_argument(
        '--central-address',
        default='0A:00:00:00:00:C0',
        help='public address of controller C0 (what HCI_Read_BD_ADDR answers)',
    )
    parser.add_argument(
        '--acl-size',
        type=int,
        default=27,
        help='LE ACL data length C0 reports to its host and cuts incoming data to',
    )
    parser.add_argument(
        '--whole-acl',
        action='store_true',
        help='hand the host whole L2CAP PDUs (Bumble\'s own behaviour) instead of fragments',
    )
    parser.add_argument(
        '--leaf-log', default='warn', help='RUST_LOG of the leaf-sims (unless set already)'
    )
    parser.add_argument('-v', '--verbose', action='store_true', help='Bumble\'s debug log')
    args = parser.parse_args(argv)
    if not args.leaf_sim:
        parser.error('--leaf-sim PATH (or $OTAGW_LEAF_SIM) is needed')
    if not args.device:
        parser.error('at least one --device')
    try:
        args.specs = [
            DeviceSpec.parse(text, i + 1, args) for i, text in enumerate(args.device)
        ]
    except ValueError as error:
        parser.error(str(error))
    addresses = [spec.address for spec in args.specs]
    if len(set(addresses)) != len(addresses):
        parser.error('two devices with the same address')
    return args


async def run(args: argparse.Namespace) -> int:
    events = EventLog()
    link = SimLink()
    c0 = SimController(
        'C0',
        link=link,
        public_address=args.central_address,
        fragment_acl=not args.whole_acl,
        log=events.emit,
    )
    c0.le_acl_data_packet_length = args.acl_size
    server: H4Server | None = None
    transport = None
    if args.hci.startswith('tcp-server:'):
        host, _, port = args.hci.removeprefix('tcp-server:').rpartition(':')
        server = H4Server(c0, events.emit)
        bound_host, bound_port = await server.start(host or '127.0.0.1', int(port))
        hci_where = f'{bound_host}:{bound_port}'
    else:
        transport = await open_transport(args.hci)
        transport.source.set_packet_sink(c0)
        c0.host = transport.sink
        hci_where = args.hci

    peripherals = [
        Peripheral(
            i + 1,
            spec,
            link,
            args.leaf_sim,
            events,
            args.adv_interval_ms,
            args.leaf_log,
        )
        for i, spec in enumerate(args.specs)
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        for peripheral in peripherals:
            await peripheral.start()
        events.ready(
            f'ready hci={hci_where} devices={",".join(p.spec.address for p in peripherals)}'
        )
        await stop.wait()
    finally:
        for peripheral in peripherals:
            await peripheral.stop()
        if server is not None:
            server.close()
        if transport is not None:
            await transport.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format='%(asctime)s %(name)s %(levelname)s: %(message)s',
    )
    try:
        return asyncio.run(run(args))
    except (RuntimeError, OSError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
