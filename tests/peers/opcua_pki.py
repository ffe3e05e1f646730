"""The self-signed application instance certificates of both asyncua test peers, made with
asyncua's own helpers (asyncua.crypto.cert_gen): an RSA 2048 key as unencrypted PKCS#8 PEM, a
certificate as DER, SHA-256 signed, valid 365 days, subject CN=<common name>, subjectAltName
URI:<application uri> (first, as OPC UA wants it), DNS:localhost, IP:127.0.0.1.

Both files are made only when absent: an existing key is kept, and an existing certificate too
unless its key had to be made anew, so a test may hand out a certificate before the peer runs.
"""

import hashlib
import ipaddress
from pathlib import Path

from asyncua.crypto import cert_gen
from asyncua.crypto.uacrypto import load_certificate, load_private_key
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

SERVER = [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
CLIENT = [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]


async def ensure_certificate(cert_file, key_file, app_uri, common_name, usage):
    """The certificate of cert_file (DER), made with the key of key_file (PEM) when absent."""
    cert_file, key_file = Path(cert_file), Path(key_file)
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    if key_file.is_file():
        key = await load_private_key(key_file)
        if cert_file.is_file():
            return await load_certificate(cert_file)
    else:
        key = cert_gen.generate_private_key()
        key_file.write_bytes(cert_gen.dump_private_key_as_pem(key))
        key_file.chmod(0o600)
    names = [
        x509.UniformResourceIdentifier(app_uri),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    cert = cert_gen.generate_self_signed_app_certificate(key, common_name, {}, names, extended=usage, days=365)
    cert_file.write_bytes(cert.public_bytes(Encoding.DER))
    return cert


def async_opcua_name(cert):
    """The file name under which async-opcua's CertificateStore looks a certificate up in its
    pki/trusted/ (and writes it to pki/rejected/): "<CN> [<sha1 of the DER, lower hex>].der"."""
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    prefix = cn[0].value.strip().replace("/", "") if cn else ""
    thumbprint = hashlib.sha1(cert.public_bytes(Encoding.DER)).hexdigest()
    return f"{prefix} [{thumbprint}].der" if prefix else f"{thumbprint}.der"
