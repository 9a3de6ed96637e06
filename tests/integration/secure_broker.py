"""A secured local broker for the security tests: certificates made at test time with
the openssl command, and ``scripts/kafka-local`` with its SASL_SSL and SSL listeners.

Nothing here is committed key material: every run makes a new CA, a broker certificate
for 127.0.0.1 and localhost, a client certificate for mutual TLS (its key encrypted
with a password), and a second CA that signed nothing the broker uses.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from consumer.security import KafkaSecurity
from tests.conftest import Broker
from tests.integration import helpers

DAYS = "2"
CLIENT_KEY_PASSWORD = "client-key-secret"


@dataclass(frozen=True)
class Pki:
    """The files the broker and the clients need, all PEM."""

    directory: Path
    ca: Path  # the CA that signed the broker's and the client's certificates
    other_ca: Path  # a CA the broker's certificate does not chain to
    broker: Path  # the broker's key followed by its certificate (kafka-local's broker.pem)
    client_cert: Path
    client_key: Path  # encrypted with CLIENT_KEY_PASSWORD
    client_key_password_file: Path


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed:\n{done.stderr}")


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", DAYS,
        "-keyout", key.name, "-out", cert.name, "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _leaf(
    directory: Path, name: str, ca: tuple[Path, Path], extensions: str, *key_args: str
) -> tuple[Path, Path]:
    cert, key, csr, ext = (directory / f"{name}.{s}" for s in ("crt", "key", "csr", "ext"))
    ext.write_text(extensions)
    _openssl(
        "req", "-new", "-newkey", "rsa:2048", *(key_args or ("-nodes",)),
        "-keyout", key.name, "-out", csr.name, "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr.name, "-CA", ca[0].name, "-CAkey", ca[1].name,
        "-CAcreateserial", "-days", DAYS, "-out", cert.name, "-extfile", ext.name,
        cwd=directory,
    )  # fmt: skip
    return cert, key


def make_pki(directory: Path) -> Pki:
    """A CA, a broker certificate (SAN 127.0.0.1 and localhost), a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "ca")
    other_ca, _ = _ca(directory, "other-ca")
    broker_cert, broker_key = _leaf(
        directory,
        "broker",
        ca,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    # The broker's PEM keystore: an unencrypted PKCS#8 key, then the certificate chain.
    broker = directory / "broker.pem"
    broker.write_text(broker_key.read_text() + broker_cert.read_text() + ca[0].read_text())
    password_file = directory / "client-key.password"
    password_file.write_text(CLIENT_KEY_PASSWORD + "\n")
    client_cert, client_key = _leaf(
        directory,
        "client",
        ca,
        "extendedKeyUsage=clientAuth\n",
        "-passout",
        f"file:{password_file.name}",
    )
    return Pki(directory, ca[0], other_ca, broker, client_cert, client_key, password_file)


class SecureBroker(Broker):
    """kafka-local with a PLAINTEXT, a SASL_SSL and an SSL (mutual TLS) listener."""

    def __init__(
        self, pki: Pki, port: int, sasl_ssl_port: int, ssl_port: int, users: dict[str, str]
    ) -> None:
        super().__init__(
            f"127.0.0.1:{port}",
            str(port),
            env={
                # A loaded machine (other brokers, other test runs) starts a JVM slowly.
                "KAFKA_LOCAL_START_TIMEOUT": "180",
                "KAFKA_LOCAL_SASL_SSL_PORT": str(sasl_ssl_port),
                "KAFKA_LOCAL_SSL_PORT": str(ssl_port),
                "KAFKA_LOCAL_TLS_DIR": str(pki.directory),
                "KAFKA_LOCAL_SASL_USERS": ",".join(f"{u}:{p}" for u, p in users.items()),
            },
        )
        self.pki = pki
        self.users = users
        self.plaintext = self.bootstrap_servers
        self.sasl_ssl = f"127.0.0.1:{sasl_ssl_port}"
        self.ssl = f"127.0.0.1:{ssl_port}"


# --- the broker's view, through a secured listener


async def end_offsets(bootstrap: str, topic: str, security: KafkaSecurity) -> dict[int, int]:
    """A topic's end offsets (partitions holding records only), read over ``security``."""
    return await helpers.end_offsets(bootstrap, topic, **security.client_kwargs())


async def wait_all_committed(
    bootstrap: str, group: str, topic: str, security: KafkaSecurity, timeout_seconds: float = 90
) -> dict[int, int]:
    """Wait until the group committed every record of the topic; return the offsets."""
    target = await helpers.wait_all_committed(
        bootstrap, group, topic, timeout_seconds, **security.client_kwargs()
    )
    assert target, f"{topic} holds no records"
    return target
