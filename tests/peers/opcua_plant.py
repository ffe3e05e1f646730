"""A plant-side OPC UA server for the tests: asyncua's server with values that change every
200 ms, so the sender has something to subscribe to, and with every service request recorded,
so a test can assert that the sender never wrote, called or added anything on the plant.

Usage: opcua_plant.py PORT. Listens on opc.tcp://127.0.0.1:PORT/, security None, anonymous.
Namespace urn:diode-test:plant holds Objects/Line3 (variables Temp, Count, Running, Label,
Total, Ratio, Small, Raw, Stamp, Levels, Faulty with BadSensorFailure) and Line3/Cell1/Pressure.
Commands on stdin, one per line, each answered by one JSON line:
  freeze | thaw     stop or restart the 200 ms updates
  add NAME          add the Double variable Line3.NAME (42.5)
  remove NAME       delete it again
  requests          {"requests": [request type names seen, sorted]}
  dump              {"nodes": [...]}: every variable under Line3 as the tests compare it
Prints "ready" once it listens; exits on EOF of stdin or SIGTERM.
"""

import asyncio
import json
import logging
import os
import signal
import sys
import threading
from datetime import datetime, timezone

from asyncua import Server, ua
from asyncua.server.uaprocessor import UaProcessor

NAMESPACE = "urn:diode-test:plant"
V = ua.VariantType
SEEN = set()

# The processor's dispatch, after the request type is decoded but before the session and
# permission checks, so that refused or failing requests are recorded as well.
_dispatch = UaProcessor._process_message


async def _recording_dispatch(self, typeid, requesthdr, seqhdr, body):
    name = ua.ObjectIdNames.get(typeid.Identifier, str(typeid))
    SEEN.add(name.removesuffix("_Encoding_DefaultBinary"))
    return await _dispatch(self, typeid, requesthdr, seqhdr, body)


UaProcessor._process_message = _recording_dispatch


from opcua_json import iso, to_json  # noqa: E402  (beside this script)


def values(n, now):
    """The value of each changing variable at tick n; every one differs from tick to tick."""
    return {
        "Temp": (20.0 + n * 0.1, V.Double),
        "Count": (n, V.Int32),
        "Running": (n % 2 == 0, V.Boolean),
        "Label": (f"batch-{n}", V.String),
        "Total": (10**12 + n, V.UInt64),
        "Ratio": ((n % 4000) * 0.25, V.Float),
        "Small": ((n % 60000) - 30000, V.Int16),
        "Raw": (bytes([n % 256, (n >> 8) % 256, 0xFF]), V.ByteString),
        "Stamp": (now, V.DateTime),
        "Levels": ([n * 1.0, n + 0.5, n + 1.0], V.Double),
        "Cell1.Pressure": (1.0 + n * 0.01, V.Double),
    }


class Plant:
    def __init__(self, port):
        self.server = Server()
        self.port = port
        self.nodes = {}
        self.tick = 0
        self.frozen = False
        self.lock = asyncio.Lock()

    async def start(self):
        await self.server.init()
        self.server.set_endpoint(f"opc.tcp://127.0.0.1:{self.port}/")
        self.server.set_server_name("diode-test plant")
        self.server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        self.idx = await self.server.register_namespace(NAMESPACE)
        objects = self.server.nodes.objects
        self.line3 = await objects.add_object(ua.NodeId("Line3", self.idx), ua.QualifiedName("Line3", self.idx))
        now = datetime.now(timezone.utc)
        start = values(0, now)
        for key, (value, vtype) in start.items():
            if "." not in key:
                self.nodes[key] = await self.add_variable(self.line3, f"Line3.{key}", key, value, vtype)
        faulty = await self.add_variable(self.line3, "Line3.Faulty", "Faulty", 0.0, V.Double)
        bad = ua.StatusCode(ua.StatusCodes.BadSensorFailure)
        await faulty.write_value(ua.DataValue(ua.Variant(0.0, V.Double), StatusCode=bad, SourceTimestamp=now))
        cell1 = await self.line3.add_folder(ua.NodeId("Line3.Cell1", self.idx), ua.QualifiedName("Cell1", self.idx))
        value, vtype = start["Cell1.Pressure"]
        self.nodes["Cell1.Pressure"] = await self.add_variable(
            cell1, "Line3.Cell1.Pressure", "Pressure", value, vtype
        )
        await self.server.start()

    async def add_variable(self, parent, node_id, name, value, vtype):
        node = await parent.add_variable(
            ua.NodeId(node_id, self.idx), ua.QualifiedName(name, self.idx), value, varianttype=vtype
        )
        await node.set_writable()
        await node.write_value(ua.DataValue(ua.Variant(value, vtype), SourceTimestamp=datetime.now(timezone.utc)))
        return node

    async def run_timer(self):
        while True:
            await asyncio.sleep(0.2)
            async with self.lock:
                if self.frozen:
                    continue
                self.tick += 1
                now = datetime.now(timezone.utc)
                for key, (value, vtype) in values(self.tick, now).items():
                    dv = ua.DataValue(ua.Variant(value, vtype), SourceTimestamp=now)
                    await self.nodes[key].write_value(dv)

    async def command(self, words):
        if words[0] in ("freeze", "thaw"):
            async with self.lock:
                self.frozen = words[0] == "freeze"
            return {"frozen": self.frozen}
        if words[0] == "add":
            node = await self.add_variable(self.line3, f"Line3.{words[1]}", words[1], 42.5, V.Double)
            return {"added": node.nodeid.to_string()}
        if words[0] == "remove":
            node = self.server.get_node(ua.NodeId(f"Line3.{words[1]}", self.idx))
            await node.delete()
            return {"removed": node.nodeid.to_string()}
        if words[0] == "requests":
            return {"requests": sorted(SEEN)}
        if words[0] == "dump":
            return {"nodes": await self.dump(self.line3, "Line3")}
        return {"error": f"unknown command {words[0]}"}

    async def dump(self, node, path):
        out = []
        for child in await node.get_children():
            name = (await child.read_browse_name()).Name
            if await child.read_node_class() == ua.NodeClass.Variable:
                dv = await child.read_data_value(raise_on_bad_status=False)
                variant = dv.Value or ua.Variant()
                out.append({
                    "path": f"{path}/{name}",
                    "node_id": child.nodeid.to_string(),
                    "data_type": variant.VariantType.name,
                    "value": to_json(variant.Value),
                    "status": dv.StatusCode.value if dv.StatusCode else 0,
                    "source_ts": iso(dv.SourceTimestamp),
                    "server_ts": iso(dv.ServerTimestamp),
                })
            out += await self.dump(child, f"{path}/{name}")
        return out


def read_stdin(loop, queue):
    """A daemon thread, so that a blocked read never holds up the exit."""
    for line in sys.stdin:
        loop.call_soon_threadsafe(queue.put_nowait, line)
    loop.call_soon_threadsafe(queue.put_nowait, None)


async def main():
    logging.basicConfig(level=logging.ERROR)
    plant = Plant(int(sys.argv[1]))
    await plant.start()
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()
    loop.add_signal_handler(signal.SIGTERM, queue.put_nowait, None)
    threading.Thread(target=read_stdin, args=(loop, queue), daemon=True).start()
    timer = asyncio.create_task(plant.run_timer())
    print("ready", flush=True)
    while (line := await queue.get()) is not None:
        if words := line.split():
            try:
                reply = await plant.command(words)
            except Exception as e:  # a bad command must not take the plant down mid-test
                reply = {"error": f"{type(e).__name__}: {e}"}
            print(json.dumps(reply), flush=True)
    timer.cancel()
    await plant.server.stop()


asyncio.run(main())
# Tearing down the standard address space's objects takes over a second; nothing is left to do.
sys.stdout.flush()
os._exit(0)
