"""A Modbus TCP PLC for the tests: pymodbus's server, with every function code it is asked for
recorded, so a test can assert that the sender never sent a write.

Usage: modbus_plc.py PORT. Commands on stdin, one per line:
  set TABLE ADDRESS WORD...   TABLE is coil, discrete, input or holding; words are 0..65535
  codes                       prints {"codes": [function codes seen, sorted]}
Prints "ready" once it listens.
"""

import asyncio
import json
import sys
import threading

from pymodbus.datastore import (
    ModbusSequentialDataBlock,
    ModbusServerContext,
    ModbusSlaveContext,
)
from pymodbus.server import StartAsyncTcpServer

SEEN = set()
TABLE_CODES = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}


class RecordingContext(ModbusSlaveContext):
    def validate(self, fc_as_hex, address, count=1):
        SEEN.add(fc_as_hex)
        return super().validate(fc_as_hex, address, count)


def control(context):
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "set":
            code = TABLE_CODES[words[1]]
            context[0].setValues(code, int(words[2]), [int(w) for w in words[3:]])
            print("ok", flush=True)
        elif words[0] == "codes":
            print(json.dumps({"codes": sorted(SEEN)}), flush=True)


async def main():
    port = int(sys.argv[1])
    store = RecordingContext(
        di=ModbusSequentialDataBlock(0, [0] * 3000),
        co=ModbusSequentialDataBlock(0, [0] * 3000),
        hr=ModbusSequentialDataBlock(0, [0] * 3000),
        ir=ModbusSequentialDataBlock(0, [0] * 3000),
        zero_mode=True,
    )
    context = ModbusServerContext(slaves=store, single=True)
    threading.Thread(target=control, args=(context,), daemon=True).start()
    loop = asyncio.get_running_loop()
    loop.call_later(0.5, lambda: print("ready", flush=True))
    await StartAsyncTcpServer(context=context, address=("127.0.0.1", port))


asyncio.run(main())
