"""A plant-side OPC UA server for the tests: asyncua's server with values that change every
200 ms, so the sender has something to subscribe to, and with every service request recorded,
so a test can assert that the sender never wrote, called or added anything on the plant.

Usage: opcua_plant.py PORT [--secure PKI_DIR] [--user NAME:PASSWORD]. Listens on
opc.tcp://127.0.0.1:PORT/; without options with security None only and anonymous logins.
  --secure PKI_DIR     only Basic256Sha256 SignAndEncrypt; a channel with security None gets
                       GetEndpoints and FindServers, anything else (CreateSession first) is
                       refused with BadSecurityPolicyRejected. The server's certificate (DER) and
                       key (PEM) are PKI_DIR/server_cert.der and PKI_DIR/server_key.pem, made
                       (see opcua_pki.py) before "ready" when absent. A client is accepted only
                       with a certificate in PKI_DIR/trusted/ (DER or PEM, read at start) that
                       also names its ApplicationUri; any other fails CreateSession with
                       BadCertificateUntrusted (or BadCertificateUriInvalid, ...UseNotAllowed).
  --user NAME:PASSWORD no anonymous logins, only this user name and password; the endpoints offer
                       only the UserName token (ActivateSession refuses anonymous with
                       BadIdentityTokenRejected, a wrong password with BadUserAccessDenied).
Namespace urn:diode-test:plant holds Objects/Line3 (variables Temp, Count, Running, Label,
Total, Ratio, Small, Raw, Stamp, Levels, Faulty with BadSensorFailure) and Line3/Cell1/Pressure.
Commands on stdin, one per line, each answered by one JSON line:
  freeze | thaw     stop or restart the 200 ms updates
  add NAME          add the Double variable Line3.NAME (42.5)
  remove NAME       delete it again
  requests          {"requests": [request type names seen, sorted]}
  dump              {"nodes": [...]}: every variable under Line3 as the tests compare it
  logins            {"accepted": [user name of each session activated, "anonymous" without --user],
                     "refused": [status name of each CreateSession or ActivateSession refused]}
  cert              {"cert": server_cert.der, "async_opcua_name": its file name in an
                     async-opcua pki/trusted/} (--secure only)
Prints "ready" once it listens; exits on EOF of stdin or SIGTERM.
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.security_policies import SecurityPolicyNone
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.uaprocessor import UaProcessor
from asyncua.server.user_managers import UserManager

NAMESPACE = "urn:diode-test:plant"
V = ua.VariantType
SEEN = set()
LOGINS = {"accepted": [], "refused": []}
SESSION_REQUESTS = ("CreateSessionRequest", "ActivateSessionRequest")
DISCOVERY = ("GetEndpointsRequest", "FindServersRequest")
SECURE_ONLY = False  # --secure: no session on a channel with security None

# The processor's dispatch, after the request type is decoded but before the session and
# permission checks, so that refused or failing requests are recorded as well.
_dispatch = UaProcessor._process_message


async def _recording_dispatch(self, typeid, requesthdr, seqhdr, body):
    name = ua.ObjectIdNames.get(typeid.Identifier, str(typeid)).removesuffix("_Encoding_DefaultBinary")
    SEEN.add(name)
    try:
        # asyncua itself lets any client open a channel with security None, for GetEndpoints, and
        # then serves it a session too, even with no None endpoint offered.
        if SECURE_ONLY and self._connection.security_policy.URI == SecurityPolicyNone.URI and name not in DISCOVERY:
            raise ServiceError(ua.StatusCodes.BadSecurityPolicyRejected)
        result = await _dispatch(self, typeid, requesthdr, seqhdr, body)
    except Exception as e:
        if name in SESSION_REQUESTS:
            code = getattr(e, "code", None)
            LOGINS["refused"].append(ua.StatusCode(code).name if code is not None else type(e).__name__)
        raise
    if name == "ActivateSessionRequest":
        LOGINS["accepted"].append(self.session.user.name or "anonymous")
    return result


UaProcessor._process_message = _recording_dispatch


from opcua_json import iso, to_json  # noqa: E402  (beside this script)
from opcua_pki import SERVER, async_opcua_name, ensure_certificate  # noqa: E402


class OneUser(UserManager):
    def __init__(self, name, password):
        self.name, self.password = name, password

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if username == self.name and password == self.password:
            return User(role=UserRole.User, name=username)
        return None  # ActivateSession answers BadUserAccessDenied


async def trusted_clients(trusted):
    """asyncua's certificate validator, with its TrustStore on the certificates in `trusted`."""
    store = TrustStore([trusted], [])
    # cryptography refuses to build an empty store; left unloaded, the store trusts nobody
    if any(p.suffix.lower() in (".der", ".pem") for p in trusted.glob("*.*")):
        await store.load()
    options = CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT
    return CertificateValidator(options, store)


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
    def __init__(self, port, pki=None, user=None):
        self.server = Server(user_manager=OneUser(*user.split(":", 1)) if user else None)
        self.port = port
        self.pki = Path(pki) if pki else None
        self.user = user
        self.cert = self.cert_name = None
        self.nodes = {}
        self.tick = 0
        self.frozen = False
        self.lock = asyncio.Lock()

    async def start(self):
        await self.server.init()
        self.server.set_endpoint(f"opc.tcp://127.0.0.1:{self.port}/")
        self.server.set_server_name("diode-test plant")
        if self.pki:
            await self.secure()
        else:
            self.server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        if self.user:
            self.server.set_identity_tokens([ua.UserNameIdentityToken])
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

    async def secure(self):
        self.cert = self.pki / "server_cert.der"
        key = self.pki / "server_key.pem"
        uri = self.server.get_application_uri()
        cert = await ensure_certificate(self.cert, key, uri, "diode-test plant", SERVER)
        self.cert_name = async_opcua_name(cert)
        await self.server.load_certificate(str(self.cert))
        await self.server.load_private_key(str(key))
        self.server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        (self.pki / "trusted").mkdir(exist_ok=True)
        self.server.set_certificate_validator(await trusted_clients(self.pki / "trusted"))
        global SECURE_ONLY
        SECURE_ONLY = True

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
        if words[0] == "logins":
            return LOGINS
        if words[0] == "cert" and self.cert:
            return {"cert": str(self.cert), "async_opcua_name": self.cert_name}
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


def arguments():
    parser = argparse.ArgumentParser(usage=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("--secure", metavar="PKI_DIR")
    parser.add_argument("--user", metavar="NAME:PASSWORD")
    args = parser.parse_args()
    if args.user and ":" not in args.user:
        parser.error("--user wants NAME:PASSWORD")
    return args


async def main(args):
    logging.basicConfig(level=logging.ERROR)
    plant = Plant(args.port, args.secure, args.user)
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


asyncio.run(main(arguments()))
# Tearing down the standard address space's objects takes over a second; nothing is left to do.
sys.stdout.flush()
os._exit(0)
