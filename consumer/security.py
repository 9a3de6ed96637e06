"""Secure connections to Kafka (TLS, mutual TLS, SASL), shared by the detector and the
simulator: the options, their validation, the client settings, and one clear line for
a connection that the security settings made fail.

Secrets (the SASL password, the client key's password) never reach a log line, an
error message or a ``repr``: messages name the option and the file, never the value.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.metadata import MetadataRequest

from consumer.options import Option, OptionError, boolean, optional_text

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
HIDDEN = "<hidden>"


class SecurityError(OptionError):
    """A security setting that cannot be used (a file that cannot be read, a key that
    does not load); the message names the option and the file, never a secret."""


def upper_choice(*allowed: str, optional: bool = False) -> Callable[[str], str | None]:
    """Parser of a choice spelt in capitals (``sasl_ssl`` is ``SASL_SSL``); with
    ``optional``, an empty value is None."""

    def parse(raw: str) -> str | None:
        value = raw.strip().upper()
        if not value and optional:
            return None
        if value not in allowed:
            raise OptionError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def optional_secret(raw: str) -> str | None:
    """A secret is taken as given (no stripping: a space may be part of it); empty is unset."""
    return raw or None


SECURITY_OPTIONS: tuple[Option, ...] = (
    Option(
        "--security-protocol",
        upper_choice(*SECURITY_PROTOCOLS),
        "PLAINTEXT",
        "how the Kafka clients connect: PLAINTEXT, SSL (TLS; mutual TLS with --ssl-certfile), "
        "SASL_PLAINTEXT or SASL_SSL (a SASL login over TLS)",
    ),
    Option(
        "--sasl-mechanism",
        upper_choice(*SASL_MECHANISMS, optional=True),
        None,
        "SASL mechanism, needed by SASL_SSL and SASL_PLAINTEXT: PLAIN, SCRAM-SHA-256 or "
        "SCRAM-SHA-512",
    ),
    Option("--sasl-username", optional_text, None, "SASL user name"),
    Option(
        "--sasl-password",
        optional_secret,
        None,
        "the SASL password itself, best from the environment; prefer --sasl-password-file "
        "(a flag shows in the process list)",
        secret=True,
    ),
    Option(
        "--sasl-password-file",
        optional_text,
        None,
        "file holding the SASL password (a trailing newline is ignored)",
    ),
    Option(
        "--ssl-cafile",
        optional_text,
        None,
        "PEM file of the CA certificate(s) that verify the broker's certificate "
        "(default: the system's trusted CAs)",
    ),
    Option(
        "--ssl-certfile",
        optional_text,
        None,
        "PEM client certificate (chain) for mutual TLS; needs --ssl-keyfile",
    ),
    Option(
        "--ssl-keyfile",
        optional_text,
        None,
        "PEM private key of --ssl-certfile (may be the same file)",
    ),
    Option(
        "--ssl-key-password-file",
        optional_text,
        None,
        "file holding the password of an encrypted --ssl-keyfile",
    ),
    Option(
        "--ssl-check-hostname",
        boolean,
        True,
        "check that the broker's certificate names the host connected to "
        "(turn off only for a broker reached by an address its certificate lacks)",
    ),
)


@dataclass(frozen=True)
class KafkaSecurity:
    """How the Kafka clients connect; the fields are the options of SECURITY_OPTIONS.

    Construction checks that the options fit together (``OptionError``); files are read
    by ``check`` and each time the client settings are made (``SecurityError``).
    """

    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    # Never in a repr: configurations end up in logs and test reports.
    sasl_password: str | None = field(default=None, repr=False)
    sasl_password_file: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_key_password_file: str | None = None
    ssl_check_hostname: bool = True

    @classmethod
    def from_options(cls, values: dict[str, Any]) -> KafkaSecurity:
        """Take the security options' values out of ``parse_options``'s result."""
        return cls(**{opt.dest: values.pop(opt.dest) for opt in SECURITY_OPTIONS})

    @property
    def sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def __post_init__(self) -> None:
        protocol = self.security_protocol
        if protocol not in SECURITY_PROTOCOLS:
            raise OptionError(f"--security-protocol must be one of {', '.join(SECURITY_PROTOCOLS)}")
        sasl_given = _given(
            ("--sasl-mechanism", self.sasl_mechanism),
            ("--sasl-username", self.sasl_username),
            ("--sasl-password", self.sasl_password),
            ("--sasl-password-file", self.sasl_password_file),
        )
        if self.sasl:
            if self.sasl_mechanism is None:
                raise OptionError(
                    f"--security-protocol {protocol} needs --sasl-mechanism "
                    f"({', '.join(SASL_MECHANISMS)})"
                )
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise OptionError(f"--sasl-mechanism must be one of {', '.join(SASL_MECHANISMS)}")
            if self.sasl_username is None:
                raise OptionError(f"--security-protocol {protocol} needs --sasl-username")
            if self.sasl_password is None and self.sasl_password_file is None:
                raise OptionError(
                    f"--security-protocol {protocol} needs --sasl-password-file "
                    "(or --sasl-password)"
                )
            if self.sasl_password is not None and self.sasl_password_file is not None:
                raise OptionError("give --sasl-password or --sasl-password-file, not both")
        elif sasl_given:
            raise OptionError(
                f"{' and '.join(sasl_given)} need --security-protocol SASL_SSL or "
                f"SASL_PLAINTEXT (it is {protocol})"
            )
        ssl_given = _given(
            ("--ssl-cafile", self.ssl_cafile),
            ("--ssl-certfile", self.ssl_certfile),
            ("--ssl-keyfile", self.ssl_keyfile),
            ("--ssl-key-password-file", self.ssl_key_password_file),
        )
        if ssl_given and not self.tls:
            raise OptionError(
                f"{' and '.join(ssl_given)} need --security-protocol SSL or SASL_SSL "
                f"(it is {protocol})"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise OptionError(
                "--ssl-certfile and --ssl-keyfile go together: give both "
                "(they may name the same file)"
            )
        if self.ssl_key_password_file is not None and self.ssl_keyfile is None:
            raise OptionError("--ssl-key-password-file needs --ssl-keyfile")

    def check(self) -> None:
        """Read every file the settings name, and build the TLS context: a file that cannot
        be used stops the program at start, naming its option (``SecurityError``)."""
        self.client_kwargs()

    def password(self) -> str | None:
        """The SASL password, from --sasl-password or its file; None without SASL."""
        if not self.sasl:
            return None
        if self.sasl_password is not None:
            return self.sasl_password
        assert self.sasl_password_file is not None
        return read_secret(self.sasl_password_file, "--sasl-password-file")

    def secrets(self) -> tuple[str, ...]:
        """Every secret these settings hold or name, for redacting logs."""
        found = [self.password()]
        if self.ssl_key_password_file is not None:
            found.append(read_secret(self.ssl_key_password_file, "--ssl-key-password-file"))
        return tuple(s for s in found if s)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context (None without TLS): the broker verified against
        --ssl-cafile (or the system's CAs), and a client certificate for mutual TLS."""
        if not self.tls:
            return None
        for flag, path in (
            ("--ssl-cafile", self.ssl_cafile),
            ("--ssl-certfile", self.ssl_certfile),
            ("--ssl-keyfile", self.ssl_keyfile),
        ):
            if path is not None:
                _readable(path, flag)
        try:
            context: ssl.SSLContext = create_ssl_context(cafile=self.ssl_cafile)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise SecurityError(
                f"--ssl-cafile {self.ssl_cafile}: no CA certificate could be loaded from it "
                f"({_reason(exc)})"
            ) from None
        if self.ssl_certfile is not None and self.ssl_keyfile is not None:
            key_password = None
            if self.ssl_key_password_file is not None:
                key_password = read_secret(self.ssl_key_password_file, "--ssl-key-password-file")
            load_cert_chain(
                context,
                self.ssl_certfile,
                self.ssl_keyfile,
                key_password,
                flags=("--ssl-certfile", "--ssl-keyfile", "--ssl-key-password-file"),
            )
        # create_ssl_context always checks the host name; the option may turn that off
        # (the certificate itself is still verified).
        context.check_hostname = self.ssl_check_hostname
        return context

    def client_kwargs(self) -> dict[str, Any]:
        """The settings every aiokafka client (consumer, producer, admin) gets."""
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.tls:
            kwargs["ssl_context"] = self.ssl_context()
        if self.sasl:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.password()
        return kwargs


def _given(*pairs: tuple[str, object]) -> list[str]:
    return [flag for flag, value in pairs if value is not None]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _readable(path: str, flag: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise SecurityError(f"cannot read {flag} {path}: {_reason(exc)}") from None


def read_secret(path: str, flag: str) -> str:
    """A secret from a file, without its trailing newline; the error names the file."""
    try:
        value = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SecurityError(f"cannot read {flag} {path}: {_reason(exc)}") from None
    except UnicodeDecodeError:
        raise SecurityError(f"{flag} {path} is not UTF-8 text") from None
    value = value.rstrip("\r\n")
    if not value:
        raise SecurityError(f"{flag} {path} is empty")
    return value


class _KeyIsEncrypted(Exception):
    pass


def _no_password() -> NoReturn:
    # Without this, OpenSSL would prompt on the terminal for an encrypted key's password.
    raise _KeyIsEncrypted


def load_cert_chain(
    context: ssl.SSLContext,
    certfile: str,
    keyfile: str,
    password: str | None,
    *,
    flags: tuple[str, str, str],
) -> None:
    """Load a certificate and its key, or raise ``SecurityError`` naming the options."""
    cert_flag, key_flag, password_flag = flags
    try:
        context.load_cert_chain(certfile, keyfile, password=password or _no_password)
    except _KeyIsEncrypted:
        raise SecurityError(f"{key_flag} {keyfile} is encrypted: give {password_flag}") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        hint = f" (is {password_flag} right?)" if password is not None else ""
        raise SecurityError(
            f"cannot load the certificate {cert_flag} {certfile} with its key {key_flag} "
            f"{keyfile}: {_reason(exc)}{hint}"
        ) from None


def server_ssl_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A TLS server context for the HTTP endpoint (--metrics-certfile/--metrics-keyfile)."""
    for flag, path in (("--metrics-certfile", certfile), ("--metrics-keyfile", keyfile)):
        _readable(path, flag)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # An encrypted key has no password option: the error says so.
    load_cert_chain(
        context,
        certfile,
        keyfile,
        None,
        flags=("--metrics-certfile", "--metrics-keyfile", "an unencrypted key"),
    )
    return context


# --- one clear line for a connection that failed


def explain(exc: BaseException, security: KafkaSecurity) -> str | None:
    """What a connection failure says about the security settings, as one line; None
    when it is not about them (a refused connection, an unknown host...)."""
    if isinstance(exc, SaslAuthenticationFailed | AuthenticationFailedError):
        said = _strip_class(exc)
        broker_said = f" (the broker said: {said})" if said != type(exc).__name__ else ""
        return (
            f"SASL authentication failed for user {security.sasl_username!r} with "
            f"{security.sasl_mechanism}{broker_said}: check --sasl-username and the password "
            "(--sasl-password-file or --sasl-password)"
        )
    if isinstance(exc, UnsupportedSaslMechanismError):
        return (
            f"the broker does not accept --sasl-mechanism {security.sasl_mechanism} on this "
            f"listener ({_strip_class(exc)})"
        )
    if isinstance(exc, IllegalSaslStateError):
        return f"the SASL exchange failed ({_strip_class(exc)}): is --sasl-mechanism right?"
    cause = exc.__cause__ if isinstance(exc, KafkaConnectionError) else exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        verify = cause.verify_message or _reason(cause)
        if "hostname" in verify.lower() or "ip address mismatch" in verify.lower():
            hint = (
                "connect by a name the certificate holds, or turn the check off with "
                "--ssl-check-hostname false"
            )
        elif security.ssl_cafile is None:
            hint = "--ssl-cafile is not set, so the system's trusted CAs were used"
        else:
            hint = f"is --ssl-cafile {security.ssl_cafile} the CA that signed it?"
        return (
            f"TLS: certificate verify failed: {verify}: the broker's certificate is not "
            f"trusted ({hint})"
        )
    if isinstance(cause, ssl.SSLError) and cause.reason and "CERTIFICATE" in cause.reason:
        return (
            f"TLS: the broker refused the client certificate, or its absence "
            f"({cause.reason}): this listener needs mutual TLS with --ssl-certfile and "
            "--ssl-keyfile, signed by a CA the broker trusts"
        )
    if _closed(exc):
        return (
            "the broker closed the connection: is --security-protocol right for this "
            f"listener? (it is {security.security_protocol})"
        )
    if isinstance(cause, ssl.SSLError):
        return (
            f"TLS handshake failed ({_reason(cause)}): is --security-protocol right for this "
            f"listener? (it is {security.security_protocol})"
        )
    return None


def _strip_class(exc: BaseException) -> str:
    """The message without aiokafka's "[Error 58] SaslAuthenticationFailed: " in front."""
    name = re.escape(type(exc).__name__)
    text = re.sub(rf"^(\[Error -?\d+\] )?{name}: ", "", str(exc).strip())
    return text or type(exc).__name__


def _closed(exc: BaseException) -> bool:
    """The broker hung up on the client: the sign of a listener speaking another protocol
    (a TLS listener reads a plaintext request as a broken TLS record, a plaintext one a
    TLS handshake as an absurd request size, and both close the connection)."""
    for e in (exc, exc.__cause__):
        if isinstance(
            e,
            ConnectionResetError
            | BrokenPipeError
            | ssl.SSLEOFError
            | ssl.SSLZeroReturnError
            | asyncio.IncompleteReadError,
        ):
            return True
    return isinstance(exc, KafkaConnectionError) and str(exc).rstrip().endswith("closed")


async def diagnose(
    bootstrap_servers: str, security: KafkaSecurity, *, timeout_seconds: float = 15.0
) -> str | None:
    """Why no client can connect, found by connecting once by hand.

    aiokafka's clients report every failed bootstrap as "Unable to bootstrap from ...",
    whatever happened; its own connection raises the real error (an SSL error, a SASL
    failure, a closed connection). Returns ``explain``'s line for the first server that
    failed for a security reason; None if one connects or none failed for such a reason.
    """
    try:
        kwargs = security.client_kwargs()
    except SecurityError as exc:
        return str(exc)
    problems: list[str] = []
    for host, port, _ in collect_hosts(bootstrap_servers, randomize=False):
        conn = None
        try:
            async with asyncio.timeout(timeout_seconds):
                conn = await create_conn(
                    host,
                    port,
                    client_id="diagnose",
                    request_timeout_ms=int(timeout_seconds * 1000),
                    **kwargs,
                )
                # An SSL client on a SASL_SSL listener gets this far; the broker hangs up
                # on the first request that is not part of a SASL login.
                await conn.send(MetadataRequest([]))
        except (OSError, KafkaError, TimeoutError) as exc:
            problem = explain(exc, security)
            if problem is not None:
                problems.append(problem)
            continue
        finally:
            if conn is not None:
                conn.close()
        return None
    return problems[0] if problems else None


# --- logs


class RedactSecrets(logging.Filter):
    """Keeps secrets out of log lines.

    aiokafka logs every request at debug level, the SASL login's too: with PLAIN, its
    bytes hold the password (and a long one is cut, so searching for the password
    would miss its first part). Those requests are logged as a placeholder; any other
    line holding a known secret has it replaced.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(_is_sasl_auth(a) for a in record.args):
            record.args = tuple(
                "<SASL authentication request: hidden>" if _is_sasl_auth(a) else a
                for a in record.args
            )
        if self._secrets:
            try:
                message = record.getMessage()
            except Exception:  # a broken format is the handler's to report
                return True
            if any(s in message for s in self._secrets):
                for s in self._secrets:
                    message = message.replace(s, HIDDEN)
                record.msg, record.args = message, None
        return True


def _is_sasl_auth(value: object) -> bool:
    return type(value).__name__.startswith("SaslAuthenticateRequest")
