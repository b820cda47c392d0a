"""Self-tests of the BLE simulator (ble_sim.py), without the gateway: each test starts the
simulator as a process and drives it with check_sim.py's Bumble central over C0's HCI TCP
port, then reads the simulator's event log.

What it is: `python3 -m unittest test_ble_sim` (standard library unittest) in this directory.
It needs Bumble (requirements.txt) and a built leaf-sim: $OTAGW_LEAF_SIM, else
$CARGO_TARGET_DIR/debug/leaf-sim, else target/debug/leaf-sim of this workspace.

What it is not: a test of the gateway, nor of the SMP device's logic (examples/leaf-sim has
its own tests); it checks what the radio, the relay and the patches to Bumble do.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import unittest
from pathlib import Path
from typing import Any

from bumble import core, hci
from bumble.core import UUID

import check_sim
import smp_codec
from check_sim import Central, Failure

HERE = Path(__file__).resolve().parent
WAIT = 10.0


def leaf_sim_path() -> str:
    candidates = [os.environ.get('OTAGW_LEAF_SIM')]
    if os.environ.get('CARGO_TARGET_DIR'):
        candidates.append(str(Path(os.environ['CARGO_TARGET_DIR']) / 'debug' / 'leaf-sim'))
    candidates.append(str(HERE.parent.parent / 'target' / 'debug' / 'leaf-sim'))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    raise RuntimeError(
        'no leaf-sim binary: build it (cargo build -p otagw-leaf-sim) or set OTAGW_LEAF_SIM'
    )


class Simulator:
    """A running ble_sim.py and its event log."""

    def __init__(self, *devices: str, extra: tuple[str, ...] = ()) -> None:
        self.devices = devices
        self.extra = extra
        self.process: asyncio.subprocess.Process | None = None
        self.events: list[dict] = []
        self.new_event = asyncio.Event()
        self.hci = ''
        self.addresses: list[str] = []
        self.reader: asyncio.Task | None = None

    async def __aenter__(self) -> Simulator:
        args = [str(HERE / 'ble_sim.py'), '--leaf-sim', leaf_sim_path(), *self.extra]
        for device in self.devices:
            args += ['--device', device]
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, *args, stdout=asyncio.subprocess.PIPE
        )
        assert self.process.stdout is not None
        line = (await asyncio.wait_for(self.process.stdout.readline(), 30)).decode()
        if not line.startswith('ready '):
            raise RuntimeError(f'the simulator said {line!r}')
        fields = dict(part.split('=', 1) for part in line.split()[1:])
        self.hci = f'tcp-client:{fields["hci"]}'
        self.addresses = fields['devices'].split(',')
        self.reader = asyncio.create_task(self.read())
        return self

    async def read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.events.append(json.loads(line))
            self.new_event.set()

    async def event(self, name: str, timeout: float = WAIT, **match: Any) -> dict:
        """The first event named `name` whose fields include `match` (waiting for it)."""

        def found() -> dict | None:
            for event in self.events:
                if event['event'] == name and all(event.get(k) == v for k, v in match.items()):
                    return event
            return None

        async def wait() -> dict:
            while (event := found()) is None:
                self.new_event.clear()
                await self.new_event.wait()
            return event

        return await asyncio.wait_for(wait(), timeout)

    def named(self, name: str, **match: Any) -> list[dict]:
        return [
            e
            for e in self.events
            if e['event'] == name and all(e.get(k) == v for k, v in match.items())
        ]

    async def __aexit__(self, *exc: Any) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
        if self.reader is not None:
            await self.reader


def connection_intervals(events: list[dict]) -> list[tuple[float, float, str]]:
    """(connect time, disconnect time, device) of every BLE connection in the log."""
    open_at: dict[str, float] = {}
    spans = []
    for event in events:
        if event['event'] == 'connect':
            open_at[event['device']] = event['t']
        elif event['event'] == 'disconnect' and event['device'] in open_at:
            spans.append((open_at.pop(event['device']), event['t'], event['device']))
    spans += [(t, float('inf'), device) for device, t in open_at.items()]
    return sorted(spans)


def image(version: str, size: int) -> tuple[bytes, bytes]:
    return smp_codec.mcuboot_image(version, bytes((i * 7 + 3) % 256 for i in range(size)))


async def upload_all(central: Central, link: check_sim.SmpLink, data: bytes) -> dict:
    stats: dict[str, Any] = {'requests': 0, 'request_bytes': 0, 'resumed_at': []}
    while True:
        try:
            await check_sim.upload(link, data, link.mtu - 3, stats)
            return stats
        except check_sim.Disconnected:
            await central.scan(WAIT)
            link = await central.connect(WAIT)


class BleSimTest(unittest.IsolatedAsyncioTestCase):
    async def test_flash_over_ble_and_connections_never_overlap(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            slot0 = Path(tmp) / 'slot0.bin'
            async with Simulator(
                f'C0:00:00:00:00:01,name=one,slot0={slot0},reboot-ms=100',
                'C0:00:00:00:00:02,name=two,version=1.4.0',
            ) as sim:
                central = Central(sim.hci, sim.addresses[0], 247)
                await central.open()
                try:
                    adv = await central.scan(WAIT)
                    self.assertEqual(adv['name'], 'one')
                    self.assertIn(check_sim.SMP_SERVICE_UUID, adv['services'])
                    link = await central.connect(WAIT)
                    self.assertEqual(link.mtu, 247)
                    new, digest = image('2.0.0', 9000)
                    await upload_all(central, link, new)
                    await link.call(2, 1, 0, {'hash': digest, 'confirm': False})
                    await link.call(2, 0, 5, {})
                    await central.wait_disconnected(WAIT)
                    await sim.event('booted', device=sim.addresses[0])
                    await central.scan(WAIT)
                    link = await central.connect(WAIT)
                    state = await link.call(0, 1, 0)
                    self.assertEqual(check_sim.slot(state, 0)['version'], '2.0.0')
                    await link.call(2, 1, 0, {'confirm': True})
                    await central.connection.disconnect()
                    await central.wait_disconnected(WAIT)

                    central.target = hci.Address(
                        sim.addresses[1], hci.Address.RANDOM_DEVICE_ADDRESS
                    )
                    await central.scan(WAIT)
                    link = await central.connect(WAIT)
                    state = await link.call(0, 1, 0)
                    self.assertEqual(check_sim.slot(state, 0)['version'], '1.4.0')
                finally:
                    await central.close()
                self.assertEqual(slot0.read_bytes(), new)
                swaps = [e['swap'] for e in sim.named('booted', device=sim.addresses[0])]
                self.assertEqual(swaps, ['test'])
                disconnect = sim.named('disconnect', device=sim.addresses[0])[0]
                self.assertEqual((disconnect['reason'], disconnect['why']), ('0x08', 'reset'))
                # One central, one connection at a time: the log shows no overlap.
                spans = connection_intervals(sim.events)
                self.assertEqual(len(spans), 3)
                for (_, end, _), (start, _, _) in zip(spans, spans[1:]):
                    self.assertLessEqual(end, start)
                # Every event line carries a time and a name.
                self.assertTrue(all('t' in e and 'event' in e for e in sim.events))

    async def test_out_of_range_mid_upload_resumes_from_the_device_offset(self) -> None:
        async with Simulator('C0:00:00:00:00:01,out-of-range=5000,out-of-range-ms=300') as sim:
            central = Central(sim.hci, sim.addresses[0], 247)
            await central.open()
            try:
                await central.scan(WAIT)
                link = await central.connect(WAIT)
                new, _ = image('2.0.0', 12000)
                stats = await upload_all(central, link, new)
            finally:
                await central.close()
            fault = await sim.event('out_of_range')
            self.assertGreaterEqual(fault['off'], 5000)
            self.assertEqual(stats['resumed_at'], [fault['off']])
            resumed = await sim.event('upload_resumed')
            self.assertEqual(resumed['off'], fault['off'])
            disconnect = sim.named('disconnect')[0]
            self.assertEqual((disconnect['reason'], disconnect['why']), ('0x08', 'out_of_range'))
            # Away for the out-of-range time, then advertising again.
            advertising = sim.named('advertising')
            self.assertEqual(len(advertising), 2)
            self.assertGreaterEqual(advertising[1]['t'] - disconnect['t'], 0.3)
            await sim.event('upload_complete')

    async def test_a_device_that_never_comes_back_after_a_reset(self) -> None:
        async with Simulator('C0:00:00:00:00:01,no-return,reboot-ms=50') as sim:
            central = Central(sim.hci, sim.addresses[0], 247)
            await central.open()
            try:
                await central.scan(WAIT)
                link = await central.connect(WAIT)
                await link.call(2, 0, 5, {})
                await central.wait_disconnected(WAIT)
                await sim.event('gone')
                await sim.event('booted')
                with self.assertRaises(Failure):
                    await central.scan(1.5)
            finally:
                await central.close()
            self.assertEqual(len(sim.named('advertising')), 1)

    async def test_hci_reset_drops_the_links_of_the_previous_host(self) -> None:
        async with Simulator('C0:00:00:00:00:01') as sim:
            first = Central(sim.hci, sim.addresses[0], 247)
            await first.open()
            await first.scan(WAIT)
            await first.connect(WAIT)
            # A new host process takes C0 over (the gateway restarted) and resets it.
            second = Central(sim.hci, sim.addresses[0], 247)
            await second.open()
            try:
                # The links' peers: the peripheral.
                await sim.event('hci_reset', links_dropped=[sim.addresses[0]])
                disconnect = await sim.event('disconnect')
                self.assertEqual((disconnect['reason'], disconnect['why']), ('0x08', 'central'))
                await second.scan(WAIT)
                link = await second.connect(WAIT)
                state = await link.call(0, 1, 0)
                self.assertEqual(check_sim.slot(state, 0)['version'], '1.0.0')
            finally:
                await second.close()
                await first.close()
            self.assertEqual(len(sim.named('hci_client_replaced')), 1)

    async def test_a_cancelled_connection_completes_and_the_next_one_works(self) -> None:
        async with Simulator('C0:00:00:00:00:01') as sim:
            central = Central(sim.hci, 'C0:00:00:00:00:99', 247)
            await central.open()
            try:
                with self.assertRaises(Failure) as caught:
                    await asyncio.wait_for(central.connect(1.0), WAIT)
                self.assertIsInstance(caught.exception.__cause__, core.TimeoutError)
                await sim.event('connect_cancelled', peer='C0:00:00:00:00:99')
                central.target = hci.Address(sim.addresses[0], hci.Address.RANDOM_DEVICE_ADDRESS)
                link = await central.connect(WAIT)
                await link.call(0, 1, 0)
            finally:
                await central.close()

    async def test_answers_need_a_subscription_on_every_connection(self) -> None:
        async with Simulator('C0:00:00:00:00:01') as sim:
            central = Central(sim.hci, sim.addresses[0], 247)
            await central.open()
            try:
                link = await central.connect(WAIT)
                await link.call(0, 1, 0)
                await central.connection.disconnect()
                await central.wait_disconnected(WAIT)
                # Connect again without subscribing: the device's answer is dropped.
                connection = await central.device.connect(
                    central.target, own_address_type=hci.OwnAddressType.RANDOM, timeout=WAIT
                )
                peer = check_sim.Peer(connection)
                await peer.request_mtu(247)
                service = (await peer.discover_service(UUID(check_sim.SMP_SERVICE_UUID)))[0]
                await service.discover_characteristics()
                characteristic = service.get_characteristics_by_uuid(
                    UUID(check_sim.SMP_CHARACTERISTIC_UUID)
                )[0]
                await characteristic.write_value(smp_codec.packet(0, 1, 0, 7), with_response=False)
                dropped = await sim.event('notify_dropped')
                self.assertEqual(dropped['seq'], 7)
                link = check_sim.SmpLink(peer, characteristic, 247, asyncio.Event())
                await characteristic.subscribe(link.on_notification)
                await link.call(0, 1, 0)
            finally:
                await central.close()
            self.assertEqual(
                [e['notify'] for e in sim.named('subscribe')], [True, True]
            )

    async def test_host_gets_fragmented_acl_and_legacy_scan_reports(self) -> None:
        async with Simulator('C0:00:00:00:00:01') as sim:
            central = Central(sim.hci, sim.addresses[0], 247)
            await central.open()
            # Tap what C0 sends the host.
            acl: list[tuple[int, int]] = []
            reports: list[int] = []
            host = central.device.host
            source = central.transport.source

            class Tap:
                def on_packet(self, packet: bytes) -> None:
                    if packet[0] == 0x02:  # ACL data
                        acl.append(((packet[2] >> 4) & 3, int.from_bytes(packet[3:5], 'little')))
                    elif packet[0] == 0x04 and packet[1] == 0x3E:  # LE meta event
                        reports.append(packet[3])
                    host.on_packet(packet)

            source.set_packet_sink(Tap())
            try:
                await central.device.start_scanning(legacy=True)
                await asyncio.sleep(0.3)
                await central.device.stop_scanning()
                self.assertIn(0x02, reports, 'legacy LE Advertising Report events')
                self.assertNotIn(0x0D, reports, 'no extended reports to a legacy scan')
                link = await central.connect(WAIT)
                state = await link.call(0, 1, 0)
                self.assertEqual(check_sim.slot(state, 0)['version'], '1.0.0')
            finally:
                await central.close()
            self.assertTrue(acl)
            self.assertLessEqual(max(length for _, length in acl), 27)
            self.assertIn(1, [pb for pb, _ in acl], 'continuation fragments')


if __name__ == '__main__':
    unittest.main()
