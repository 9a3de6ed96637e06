"""TLS and SASL settings without a broker: options, validation, client settings, the
one-line explanations, log redaction and the HTTPS endpoint."""

from __future__ import annotations

import asyncio
import logging
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from prometheus_client import CollectorRegistry

from consumer.config import OPTIONS, load_config
from consumer.http import Health, HttpServer
from consumer.security import (
    SECURITY_OPTIONS,
    KafkaSecurity,
    RedactSecrets,
    SecurityError,
    explain,
    server_ssl_context,
)
from consumer.topics import main as topics_main
from producer_sim.cli import EVALUATE_OPTIONS, RUN_OPTIONS, amain, parse_evaluate, parse_run
from tests.integration.secure_broker import CLIENT_KEY_PASSWORD, Pki, make_pki

PASSWORD = "s3cret-Pa55word"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "sasl.password"
    path.write_text(PASSWORD + "\n")
    return path


def sasl_ssl(pki: Pki, password_file: Path, *extra: str) -> list[str]:
    return [
        "--security-protocol", "sasl_ssl", "--sasl-mechanism", "scram-sha-512",
        "--sasl-username", "alice", "--sasl-password-file", str(password_file),
        "--ssl-cafile", str(pki.ca), *extra,
    ]  # fmt: skip


def test_both_programs_share_the_security_options() -> None:
    for table in (OPTIONS, RUN_OPTIONS, EVALUATE_OPTIONS):
        assert all(opt in table for opt in SECURITY_OPTIONS)
    secret = [o.flag for o in SECURITY_OPTIONS if o.secret]
    assert secret == ["--sasl-password"]


def test_defaults_are_plaintext() -> None:
    security = load_config([], environ={}).security
    assert security == KafkaSecurity()
    assert security.client_kwargs() == {"security_protocol": "PLAINTEXT"}
    assert security.ssl_check_hostname is True


def test_sasl_ssl_from_flags_and_the_environment(pki: Pki, password_file: Path) -> None:
    config = load_config(sasl_ssl(pki, password_file), environ={})
    security = config.security
    assert (security.security_protocol, security.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    kwargs = security.client_kwargs()
    assert kwargs["sasl_plain_password"] == PASSWORD  # the trailing newline is not part of it
    assert (kwargs["sasl_mechanism"], kwargs["sasl_plain_username"]) == ("SCRAM-SHA-512", "alice")
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname

    environ = {
        "ANOMALY_SECURITY_PROTOCOL": "SSL",
        "ANOMALY_SSL_CAFILE": str(pki.ca),
        "ANOMALY_SSL_CERTFILE": str(pki.client_cert),
        "ANOMALY_SSL_KEYFILE": str(pki.client_key),
        "ANOMALY_SSL_KEY_PASSWORD_FILE": str(pki.client_key_password_file),
        "ANOMALY_SSL_CHECK_HOSTNAME": "false",
    }
    security = load_config([], environ=environ).security
    kwargs = security.client_kwargs()
    assert set(kwargs) == {"security_protocol", "ssl_context"}
    assert kwargs["ssl_context"].check_hostname is False
    assert kwargs["ssl_context"].verify_mode == ssl.CERT_REQUIRED  # still verified


def test_the_simulator_reads_the_same_settings_from_sim_variables(pki: Pki) -> None:
    environ = {
        "SIM_SECURITY_PROTOCOL": "SASL_SSL",
        "SIM_SASL_MECHANISM": "PLAIN",
        "SIM_SASL_USERNAME": "bob",
        "SIM_SASL_PASSWORD": PASSWORD,
        "SIM_SSL_CAFILE": str(pki.ca),
    }
    run = parse_run([], environ, now=0.0)
    evaluate, _ = parse_evaluate([], environ)
    for security in (run.security, evaluate.security):
        assert security.client_kwargs()["sasl_plain_password"] == PASSWORD
        assert PASSWORD not in repr(security)
    assert PASSWORD not in repr(run)
    assert PASSWORD not in repr(evaluate)


def test_repr_of_the_configuration_hides_the_password(pki: Pki) -> None:
    config = load_config(
        ["--security-protocol", "SASL_SSL", "--sasl-mechanism", "PLAIN", "--sasl-username", "u",
         "--sasl-password", PASSWORD, "--ssl-cafile", str(pki.ca)],
        environ={},
    )  # fmt: skip
    assert config.security.password() == PASSWORD
    assert PASSWORD not in repr(config)
    assert PASSWORD not in str(config)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["--security-protocol", "SASL_SSL"],
            "--security-protocol SASL_SSL needs --sasl-mechanism",
        ),
        (["--security-protocol", "TLS"], "--security-protocol: must be one of PLAINTEXT, SSL"),
        (["--sasl-mechanism", "GSSAPI"], "'GSSAPI' for --sasl-mechanism: must be one of PLAIN"),
        (
            ["--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "PLAIN"],
            "needs --sasl-username",
        ),
        (
            [
                "--security-protocol",
                "SASL_SSL",
                "--sasl-mechanism",
                "PLAIN",
                "--sasl-username",
                "u",
            ],
            "needs --sasl-password-file (or --sasl-password)",
        ),
        (
            ["--sasl-username", "u", "--sasl-mechanism", "PLAIN"],
            "--sasl-mechanism and --sasl-username need --security-protocol SASL_SSL",
        ),
        (["--ssl-cafile", "/ca.pem"], "--ssl-cafile need --security-protocol SSL or SASL_SSL"),
        (
            ["--security-protocol", "SSL", "--ssl-certfile", "/c.pem"],
            "--ssl-certfile and --ssl-keyfile go together",
        ),
        (
            ["--security-protocol", "SSL", "--ssl-key-password-file", "/p"],
            "--ssl-key-password-file needs --ssl-keyfile",
        ),
        (
            ["--security-protocol", "SSL", "--ssl-cafile", "/no/such/ca.pem"],
            "cannot read --ssl-cafile /no/such/ca.pem: No such file or directory",
        ),
        (["--metrics-certfile", "/c.pem"], "--metrics-certfile and --metrics-keyfile go together"),
    ],
)
def test_settings_that_do_not_fit_stop_with_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        load_config(argv, environ={})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("anomaly-detector: error:")
    assert needle in err
    assert err.count("\n") == 1


def test_password_and_password_file_are_not_both_given(
    password_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--security-protocol", "SASL_SSL", "--sasl-mechanism", "PLAIN", "--sasl-username",
            "u", "--sasl-password-file", str(password_file)]  # fmt: skip
    with pytest.raises(SystemExit):
        load_config(argv, environ={"ANOMALY_SASL_PASSWORD": PASSWORD})
    err = capsys.readouterr().err
    assert "give --sasl-password or --sasl-password-file, not both" in err
    assert PASSWORD not in err


def test_unusable_files_are_named_never_their_secret(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "a-directory"  # unreadable as a file, even for root
    directory.mkdir()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    wrong_key_password = tmp_path / "wrong"
    wrong_key_password.write_text("not-the-key-password")
    mtls = ["--security-protocol", "SSL", "--ssl-certfile", str(pki.client_cert),
            "--ssl-keyfile", str(pki.client_key)]  # fmt: skip
    cases: list[tuple[list[str], str]] = [
        (sasl_ssl(pki, empty), f"--sasl-password-file {empty} is empty"),
        (mtls, f"--ssl-keyfile {pki.client_key} is encrypted: give --ssl-key-password-file"),
        (
            [*mtls, "--ssl-key-password-file", str(wrong_key_password)],
            "(is --ssl-key-password-file right?)",
        ),
        (
            ["--security-protocol", "SSL", "--ssl-cafile", str(pki.client_key)],
            f"--ssl-cafile {pki.client_key}: no CA certificate could be loaded",
        ),
        (
            sasl_ssl(pki, directory),
            f"cannot read --sasl-password-file {directory}: Is a directory",
        ),
        (
            sasl_ssl(pki, tmp_path / "missing"),
            f"cannot read --sasl-password-file {tmp_path / 'missing'}: No such file",
        ),
    ]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as exc:
            load_config(argv, environ={})
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert needle in err, err
        assert err.count("\n") == 1
        assert PASSWORD not in err
        assert "not-the-key-password" not in err
        assert CLIENT_KEY_PASSWORD not in err


async def test_the_simulator_refuses_bad_settings_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for command in ("run", "evaluate"):
        with pytest.raises(SystemExit) as exc:
            await amain([command, "--security-protocol", "SASL_SSL"], environ={})
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"producer-sim {command}: error:")
        assert "needs --sasl-mechanism" in err
        assert err.count("\n") == 1


def test_the_topics_command_takes_the_security_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        topics_main(["--security-protocol", "SASL_SSL", "--sasl-mechanism", "PLAIN", "t"])
    assert exc.value.code == 2
    assert "needs --sasl-username" in capsys.readouterr().err


def test_connection_failures_are_explained_in_one_line() -> None:
    security = KafkaSecurity(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="alice",
        sasl_password=PASSWORD,
        ssl_cafile="/ca.pem",
    )
    auth = explain(SaslAuthenticationFailed("Authentication failed: Invalid credentials"), security)
    assert auth is not None
    assert auth.startswith("SASL authentication failed for user 'alice' with SCRAM-SHA-512")
    assert "Error 58" not in auth

    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "self-signed certificate in certificate chain"
    text = explain(verify, security)
    assert text is not None
    assert "certificate verify failed" in text
    assert "/ca.pem" in text
    mismatch = ssl.SSLCertVerificationError(1, "certificate verify failed")
    mismatch.verify_message = "Hostname mismatch, certificate is not valid for 'kafka'."
    assert "--ssl-check-hostname false" in (explain(mismatch, security) or "")

    closed = KafkaConnectionError("Connection at 127.0.0.1:9093 closed")
    closed.__cause__ = asyncio.IncompleteReadError(b"", 10)
    assert "the broker closed the connection: is --security-protocol right" in (
        explain(closed, security) or ""
    )
    assert "the broker closed the connection" in (explain(ConnectionResetError(), security) or "")

    refused_cert = KafkaConnectionError("Connection at 127.0.0.1:9093 closed")
    refused_cert.__cause__ = ssl.SSLError(1, "[SSL: SSLV3_ALERT_BAD_CERTIFICATE] bad certificate")
    refused_cert.__cause__.reason = "SSLV3_ALERT_BAD_CERTIFICATE"
    assert "client certificate" in (explain(refused_cert, security) or "")

    mechanism = explain(UnsupportedSaslMechanismError("not enabled"), security)
    assert mechanism is not None
    assert "--sasl-mechanism SCRAM-SHA-512" in mechanism

    # Not about security: the caller's own message ("cannot reach Kafka") stays.
    assert explain(ConnectionRefusedError(111, "Connect call failed"), security) is None
    assert explain(KafkaConnectionError("Unable to bootstrap from []"), security) is None


def test_logs_never_show_a_sasl_login_or_a_known_secret(caplog: pytest.LogCaptureFixture) -> None:
    class SaslAuthenticateRequest_v1:
        def __repr__(self) -> str:
            return f"SaslAuthenticateRequest_v1(sasl_auth_bytes=b'u\\x00u\\x00{PASSWORD}')"

    logger = logging.getLogger("aiokafka.conn.test")
    redact = RedactSecrets([PASSWORD])
    caplog.handler.addFilter(redact)
    try:
        with caplog.at_level(logging.DEBUG, logger="aiokafka"):
            logger.debug("Request to %s:%d %d: %s", "h", 1, 3, SaslAuthenticateRequest_v1())
            logger.info("the password is %s, again %s", PASSWORD, PASSWORD)
            logger.info("nothing %s here", "secret")
    finally:
        caplog.handler.removeFilter(redact)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "Request to h:1 3: <SASL authentication request: hidden>",
        "the password is <hidden>, again <hidden>",
        "nothing secret here",
    ]
    assert PASSWORD not in caplog.text


@pytest.fixture
def https(pki: Pki) -> Iterator[HttpServer]:
    # broker.pem holds the key and the certificate chain: one file for both options.
    context = server_ssl_context(str(pki.broker), str(pki.broker))
    server = HttpServer("127.0.0.1", 0, CollectorRegistry(), Health(), ssl_context=context)
    server.start()
    yield server
    server.stop()


def test_the_metrics_endpoint_serves_https_only(https: HttpServer, pki: Pki) -> None:
    trusted = ssl.create_default_context(cafile=str(pki.ca))
    url = f"https://127.0.0.1:{https.port}/healthz"
    with urllib.request.urlopen(url, context=trusted, timeout=5) as reply:
        assert reply.status == 200
    # Plain HTTP on the HTTPS port: the server hangs up at the failed handshake
    # (http.client's RemoteDisconnected, or a reset if it left bytes unread).
    with pytest.raises(ConnectionResetError):
        urllib.request.urlopen(f"http://127.0.0.1:{https.port}/healthz", timeout=5)
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(url, timeout=5)  # the system's CAs do not know ours
    # Failed handshakes took nothing down.
    with urllib.request.urlopen(url, context=trusted, timeout=5) as reply:
        assert reply.status == 200


def test_metrics_tls_files_are_checked_at_start(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(
        ["--metrics-certfile", str(pki.broker), "--metrics-keyfile", str(pki.broker)], environ={}
    )
    assert config.metrics_tls
    with pytest.raises(SystemExit):
        load_config(
            ["--metrics-certfile", str(pki.client_cert), "--metrics-keyfile", str(pki.client_key)],
            environ={},
        )
    assert "--metrics-keyfile" in capsys.readouterr().err
    with pytest.raises(SecurityError, match="--metrics-certfile /nope"):
        server_ssl_context("/nope", "/nope")
