"""TLS services of the tests: certificates made with ``openssl``, a RabbitMQ 4 node with TLS
listeners and a redis-server with a TLS port, both requiring a client certificate, both
listening on 127.0.0.1 (named in their certificate) and 127.0.0.2 (not named in it)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.rabbit import RabbitNode
from tests.services import free_port, wait_for

__all__ = ["Certificates", "TlsRabbit", "make_certificates", "tls_rabbit", "tls_redis"]

# Loopback, but not an address the server certificate is for: the host name check must fail.
UNNAMED_HOST = "127.0.0.2"


@dataclass(frozen=True)
class Certificates:
    """A CA, a server certificate it signed for localhost and 127.0.0.1, a client certificate
    it signed, and a second CA that signed nothing of these."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _new_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-days", "2", "-subj", f"/CN=avocado test {name}"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        *("-keyout", key, "-out", cert),
    )
    return cert, key


def _signed(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> Path:
    """Issue ``name``.pem (key ``name``.key) from ``ca`` with the given X.509 extensions."""
    key, csr, ext = (directory / f"{name}.{suffix}" for suffix in ("key", "csr", "ext"))
    _openssl(
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-subj", f"/CN={name}", "-keyout", key, "-out", csr),
    )
    ext.write_text(extensions)
    cert = directory / f"{name}.pem"
    _openssl(
        *("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial"),
        *("-days", "2", "-extfile", ext, "-out", cert),
    )
    return cert


def make_certificates(directory: Path) -> Certificates:
    """Fresh certificates in ``directory``, valid for two days."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _new_ca(directory, "ca")
    server = _signed(
        directory,
        "server",
        ca,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    client = _signed(directory, "client", ca, "extendedKeyUsage=clientAuth\n")
    other_ca, _ = _new_ca(directory, "other-ca")
    return Certificates(
        ca=ca[0],
        server_cert=server,
        server_key=directory / "server.key",
        client_cert=client,
        client_key=directory / "client.key",
        other_ca=other_ca,
    )


def _client_context(certs: Certificates) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return context


@dataclass(frozen=True)
class TlsRabbit:
    """A private RabbitMQ 4 node: plain AMQP on ``node.port`` (for rabbitmqctl's set-up only)
    and AMQP over TLS on ``tls_port``."""

    node: RabbitNode
    tls_port: int

    def url(self, vhost: str, host: str = "127.0.0.1") -> str:
        return f"amqps://guest:guest@{host}:{self.tls_port}/{vhost}"


@contextmanager
def tls_rabbit(certs: Certificates) -> Iterator[TlsRabbit]:
    """Start the node with TLS listeners that require a client certificate of ``certs``'s CA;
    wiped at the end."""
    node = RabbitNode.private(4, port=free_port())
    tls_port = free_port()
    data = node.data_dir()
    data.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    for field in ("ca", "server_cert", "server_key"):
        copy = data / Path(getattr(certs, field)).name
        shutil.copy(getattr(certs, field), copy)
        names[field] = node.path_in_node(copy)
    conf = "\n".join(
        [
            f"listeners.ssl.1 = 127.0.0.1:{tls_port}",
            f"listeners.ssl.2 = {UNNAMED_HOST}:{tls_port}",
            f"ssl_options.cacertfile = {names['ca']}",
            f"ssl_options.certfile = {names['server_cert']}",
            f"ssl_options.keyfile = {names['server_key']}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
            "",
        ]
    )
    try:
        node.start(conf)
        context = _client_context(certs)

        def handshakes() -> bool:
            try:
                with (
                    socket.create_connection(("127.0.0.1", tls_port), timeout=2) as raw,
                    context.wrap_socket(raw, server_hostname="127.0.0.1"),
                ):
                    return True
            except OSError:
                return False

        wait_for(handshakes, timeout=30, what=f"RabbitMQ's TLS listener on {tls_port}")
        yield TlsRabbit(node, tls_port)
    finally:
        node.wipe()


@contextmanager
def tls_redis(certs: Certificates, data_dir: Path) -> Iterator[str]:
    """A private redis-server serving only TLS, client certificate required; yields its
    ``rediss://`` URL on 127.0.0.1."""
    port = free_port()
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    args = [exe, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", UNNAMED_HOST]
    args += ["--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key)]
    args += ["--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "yes"]
    args += ["--save", "", "--appendonly", "no", "--dir", str(data_dir)]
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"rediss://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(
        url,
        ssl_ca_certs=str(certs.ca),
        ssl_certfile=str(certs.client_cert),
        ssl_keyfile=str(certs.client_key),
        socket_connect_timeout=1,
    )

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"redis-server exited with {process.returncode}")
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_for(answers, timeout=30, what=f"redis-server's TLS port {port}")
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=30)
