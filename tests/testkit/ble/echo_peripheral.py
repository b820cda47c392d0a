"""A BLE peripheral for the tests of otagw's BLE link (gateway/src/link/ble.rs).

One process, one Bumble `LocalLink`: controller C0 is the gateway's, exported
as HCI H4 on a TCP server (`tcp-server:127.0.0.1:PORT`); controller C1 carries
a peripheral with a random static address that advertises and offers:
- the SMP service and characteristic (write without response + notify): every
  write comes back as a notification, except `reset`, after which the
  peripheral disconnects, waits 300 ms and advertises again (a device that
  rebooted into a new image);
- the Device Information service's Firmware Revision String (2A26): "1.0.0".

It prints `ready` once advertising, then one line per event (`connected`,
`disconnected`, `write N`). What it is not: an SMP device (that is
examples/ble-sim).

Usage: echo_peripheral.py HCI_TRANSPORT ADDRESS
"""
import asyncio
import sys

from bumble.controller import Controller
from bumble.device import Device
from bumble import hci
from bumble.gatt import Characteristic, CharacteristicValue, Service
from bumble.hci import Address
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport import open_transport
from bumble.transport.common import AsyncPipeSink

SMP_SERVICE = '8D53DC1D-1DB7-4CD3-868B-8A527460AA84'
SMP_CHARACTERISTIC = 'DA2E7828-FBCE-4E01-AE9E-261174997C48'


def complete_cancelled_connections(controller: Controller) -> None:
    """Bumble 0.0.236's LE Create Connection Cancel answers success but never
    ends the pending connection, so the next LE Create Connection is refused
    (Command Disallowed). A real controller ends it with an LE Connection
    Complete event, status Unknown Connection Identifier (Core Vol 4, Part E,
    7.8.13): do that."""
    original = controller.on_hci_le_create_connection_cancel_command

    def cancel(command):
        pending = controller.pending_le_connection
        controller.pending_le_connection = None
        if pending is not None:
            event = hci.HCI_LE_Connection_Complete_Event(
                status=hci.HCI_ErrorCode.UNKNOWN_CONNECTION_IDENTIFIER_ERROR,
                connection_handle=0,
                role=0,
                peer_address_type=pending.peer_address_type,
                peer_address=pending.peer_address,
                connection_interval=0,
                peripheral_latency=0,
                supervision_timeout=0,
                central_clock_accuracy=0,
            )
            # Right after the Command Complete of this command, which the
            # controller queues once this returns (as a real one orders them).
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, controller.send_hci_packet, event)
        return original(command)

    controller.on_hci_le_create_connection_cancel_command = cancel


async def main(transport_name: str, address: str) -> None:
    link = LocalLink()
    transport = await open_transport(transport_name)
    gateway = Controller('C0', host_source=transport.source, host_sink=transport.sink, link=link)
    complete_cancelled_connections(gateway)
    peripheral = Controller('C1', link=link, public_address=address)
    addr = Address(address, Address.RANDOM_DEVICE_ADDRESS)
    device = Device(address=addr, host=Host(peripheral, AsyncPipeSink(peripheral)))
    loop = asyncio.get_running_loop()

    async def reboot(connection) -> None:
        # The central may hang up first (it reopens the link at once); a
        # rebooting device comes back either way.
        try:
            await connection.disconnect()
        except Exception as e:  # noqa: BLE001 - already gone is fine
            print(f'disconnect: {e!r}', file=sys.stderr, flush=True)
        await asyncio.sleep(0.3)
        await device.start_advertising(own_address_type=1)

    def on_write(connection, value) -> None:
        print(f'write {len(value)}', flush=True)
        if bytes(value) == b'reset':
            loop.create_task(reboot(connection))
        else:
            loop.create_task(device.notify_subscribers(smp, bytes(value)))

    smp = Characteristic(
        SMP_CHARACTERISTIC,
        Characteristic.Properties.WRITE_WITHOUT_RESPONSE | Characteristic.Properties.NOTIFY,
        Characteristic.WRITEABLE,
        CharacteristicValue(write=on_write),
    )
    revision = Characteristic('2A26', Characteristic.Properties.READ, Characteristic.READABLE, b'1.0.0')
    device.add_service(Service(SMP_SERVICE, [smp]))
    device.add_service(Service('180A', [revision]))
    device.on('connection', lambda c: print('connected', flush=True))
    device.on('disconnection', lambda r: print('disconnected', flush=True))
    await device.power_on()
    await device.start_advertising(own_address_type=1)
    print('ready', flush=True)
    await loop.create_future()


if __name__ == '__main__':
    asyncio.run(main(sys.argv[1], sys.argv[2]))
