"""An IT-side OPC UA client for the tests: asyncua's client, an implementation independent of
ours, pointed at the receiver's mirror server to see what the IT side sees, and to prove that
the mirror refuses every way of writing back toward the plant.

Usage: opcua_client.py [--secure CLIENT_PKI_DIR] [--user NAME:PASSWORD] ENDPOINT COMMAND [ARGS]
  --secure DIR   Basic256Sha256 SignAndEncrypt (else security None) with the certificate
                 DIR/client_cert.der and key DIR/client_key.pem, made when absent (opcua_pki.py,
                 application uri urn:diode-test:it-client). The server's certificate is taken
                 from its GetEndpoints answer (over a None channel) and never checked.
  --user N:P     log in as user N with password P (else anonymous)
Commands:
  dump ROOT_PATH              {"nodes": [...]}: every variable under ROOT_PATH, as opcua_plant.py dumps
  write NODE_ID VALUE_JSON    {"status": int, "name": str} of a Write of the Value attribute
                              (a JSON float is sent as Double, an integer as Int32)
  call OBJECT_ID METHOD_ID    {"status": int, "name": str} of a Call without arguments
  addnode PARENT_ID           {"status": int, "name": str} of an AddNodes of a Double variable
  subscribe ROOT_PATH SECONDS {"changes": {path: data change notifications in SECONDS}}
  wait-path ROOT_PATH SECONDS {"found": bool}, browsing every 200 ms
  make-cert                   {"cert": DIR/client_cert.der, "async_opcua_name": its file name in
                              an async-opcua pki/trusted/}: only makes the files, with --secure
                              and without ENDPOINT
ROOT_PATH is browse names from Objects joined by "/", namespace indexes ignored; dumped paths
start at its last element, so plant "Line3" and mirror "plant/Line3" give the same paths.
Exits 0 once it printed its JSON line; {"error": ...} and exit 2 when it could not get there.
"""

import asyncio
import json
import logging
import sys
import time
from pathlib import Path

from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

APP_URI = "urn:diode-test:it-client"


class PathNotFound(Exception):
    pass


from opcua_json import iso, to_json  # noqa: E402  (beside this script)
from opcua_pki import CLIENT, async_opcua_name, ensure_certificate  # noqa: E402


async def make_cert(pki):
    """(certificate file, key file, certificate) of this client, made when absent."""
    cert_file, key_file = Path(pki) / "client_cert.der", Path(pki) / "client_key.pem"
    cert = await ensure_certificate(cert_file, key_file, APP_URI, "diode-test it-client", CLIENT)
    return cert_file, key_file, cert


async def new_client(endpoint, options):
    """A client, not yet connected; with --secure this already asked the server for its
    endpoints (and so its certificate), over a None channel of its own."""
    client = Client(endpoint, timeout=5)
    client.application_uri = APP_URI
    if user := options.get("user"):
        name, _, password = user.partition(":")
        client.set_user(name)
        client.set_password(password)
    if pki := options.get("secure"):
        cert_file, key_file, _ = await make_cert(pki)
        await client.set_security(
            SecurityPolicyBasic256Sha256, str(cert_file), str(key_file), mode=ua.MessageSecurityMode.SignAndEncrypt
        )
    return client


def outcome(code):
    code = ua.StatusCode(code)
    return {"status": code.value, "name": code.name}


async def children(client, node_id):
    node = client.get_node(node_id)
    return await node.get_children_descriptions(refs=ua.ObjectIds.HierarchicalReferences)


async def find_root(client, root_path):
    node_id = client.nodes.objects.nodeid
    for name in root_path.strip("/").split("/"):
        match = [d for d in await children(client, node_id) if d.BrowseName.Name == name]
        if not match:
            raise PathNotFound(root_path)
        node_id = match[0].NodeId
    return node_id


async def variables(client, root_path):
    """(path, node id) of every variable under the root, depth first in browse order."""
    root = await find_root(client, root_path)
    out, seen = [], {root}

    async def walk(node_id, path):
        for desc in await children(client, node_id):
            if desc.NodeId in seen:
                continue
            seen.add(desc.NodeId)
            child = f"{path}/{desc.BrowseName.Name}"
            if desc.NodeClass == ua.NodeClass.Variable:
                out.append((child, desc.NodeId))
            await walk(desc.NodeId, child)

    await walk(root, root_path.strip("/").split("/")[-1])
    return out


async def dump(client, root_path):
    found = await variables(client, root_path)
    nodes = []
    for start in range(0, len(found), 50):
        batch = found[start:start + 50]
        params = ua.ReadParameters()
        params.TimestampsToReturn = ua.TimestampsToReturn.Both
        params.NodesToRead = [ua.ReadValueId(NodeId=n, AttributeId=ua.AttributeIds.Value) for _, n in batch]
        for (path, node_id), dv in zip(batch, await client.uaclient.read(params)):
            variant = dv.Value or ua.Variant()
            nodes.append({
                "path": path,
                "node_id": node_id.to_string(),
                "data_type": variant.VariantType.name,
                "value": to_json(variant.Value),
                "status": dv.StatusCode.value if dv.StatusCode else 0,
                "source_ts": iso(dv.SourceTimestamp),
                "server_ts": iso(dv.ServerTimestamp),
            })
    return {"nodes": nodes}


async def write(client, node_id, value_json):
    value = json.loads(value_json)
    kinds = {bool: ua.VariantType.Boolean, int: ua.VariantType.Int32, float: ua.VariantType.Double}
    dv = ua.DataValue(ua.Variant(value, kinds.get(type(value))))
    [status] = await client.uaclient.write_attributes([ua.NodeId.from_string(node_id)], [dv])
    return outcome(status.value)


async def call(client, object_id, method_id):
    request = ua.CallMethodRequest(
        ObjectId=ua.NodeId.from_string(object_id), MethodId=ua.NodeId.from_string(method_id)
    )
    [result] = await client.uaclient.call([request])
    return outcome(result.StatusCode.value)


async def addnode(client, parent_id):
    parent = ua.NodeId.from_string(parent_id)
    attrs = ua.VariableAttributes(
        DisplayName=ua.LocalizedText("DiodeProbe"),
        Value=ua.Variant(1.0, ua.VariantType.Double),
        DataType=ua.NodeId(ua.ObjectIds.Double),
        ValueRank=ua.ValueRank.Scalar,
        AccessLevel=ua.AccessLevel.CurrentRead.mask,
        UserAccessLevel=ua.AccessLevel.CurrentRead.mask,
    )
    item = ua.AddNodesItem(
        ParentNodeId=parent,
        ReferenceTypeId=ua.NodeId(ua.ObjectIds.HasComponent),
        RequestedNewNodeId=ua.NodeId("DiodeProbe", parent.NamespaceIndex),
        BrowseName=ua.QualifiedName("DiodeProbe", parent.NamespaceIndex),
        NodeClass=ua.NodeClass.Variable,
        NodeAttributes=attrs,
        TypeDefinition=ua.NodeId(ua.ObjectIds.BaseDataVariableType),
    )
    [result] = await client.uaclient.add_nodes([item])
    return outcome(result.StatusCode.value)


WRITE_BACK = {"write": write, "call": call, "addnode": addnode}


class Counter:
    def __init__(self, paths):
        self.paths = paths
        self.changes = {path: 0 for path in paths.values()}

    def datachange_notification(self, node, val, data):
        self.changes[self.paths[node.nodeid]] += 1


async def subscribe(client, root_path, seconds):
    found = await variables(client, root_path)
    counter = Counter({node_id: path for path, node_id in found})
    subscription = await client.create_subscription(100, counter)
    await subscription.subscribe_data_change(
        [client.get_node(n) for _, n in found], sampling_interval=100
    )
    await asyncio.sleep(float(seconds))
    await subscription.delete()
    return {"changes": counter.changes}


async def disconnect(client):
    """A server that drops the connection after refusing something must not cost the answer."""
    try:
        await client.disconnect()
    except Exception:
        pass


async def session(options, endpoint, command, args):
    client = await new_client(endpoint, options)
    await client.connect()
    try:
        if command == "dump":
            return await dump(client, *args)
        if command in WRITE_BACK:
            try:
                return await WRITE_BACK[command](client, *args)
            except ua.UaStatusCodeError as e:  # refused as a whole: a ServiceFault
                return outcome(e.code)
        if command == "subscribe":
            return await subscribe(client, *args)
        raise ValueError(f"unknown command {command}")
    finally:
        await disconnect(client)


async def wait_path(options, endpoint, root_path, seconds):
    """Retries the connection too, so a test may start it before the mirror listens; a server
    that never answered is an error, one that never showed the path is {"found": false}."""
    deadline = time.monotonic() + float(seconds)
    while True:
        try:
            client = await new_client(endpoint, options)
            await client.connect()
            try:
                while True:
                    try:
                        await find_root(client, root_path)
                        return {"found": True}
                    except PathNotFound:
                        if time.monotonic() >= deadline:
                            return {"found": False}
                    await asyncio.sleep(0.2)
            finally:
                await disconnect(client)
        except (OSError, asyncio.TimeoutError, ua.UaError):
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(0.2)


async def main(options, endpoint, command, *args):
    if command == "make-cert":
        if not options.get("secure"):
            raise ValueError("make-cert needs --secure DIR")
        cert_file, _, cert = await make_cert(options["secure"])
        return {"cert": str(cert_file), "async_opcua_name": async_opcua_name(cert)}
    if command == "wait-path":
        return await wait_path(options, endpoint, *args)
    # a refused connection or login is an error, whatever the command
    return await session(options, endpoint, command, args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.CRITICAL)
    argv, options = sys.argv[1:], {}
    while len(argv) >= 2 and argv[0] in ("--secure", "--user"):
        options[argv[0][2:]] = argv[1]
        argv = argv[2:]
    if argv[:1] == ["make-cert"]:
        argv = [None] + argv
    if len(argv) < 2:
        sys.exit(__doc__)
    try:
        reply = asyncio.run(main(options, *argv))
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        sys.exit(2)
    print(json.dumps(reply), flush=True)
