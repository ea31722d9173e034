"""TLS options from the settings, and the plaintext warning, without any server."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError

from avocado_shared import Settings
from avocado_shared.celery_config import celery_config
from avocado_shared.tls import CertificateError, broker_ssl, redis_ssl, refuse_untrusted


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    path = tmp_path / "some.pem"
    path.write_text("not read by these tests\n")
    return path


def test_plaintext_urls_get_no_tls_options() -> None:
    config = celery_config(Settings())
    assert config["broker_use_ssl"] is False
    assert config["redis_backend_use_ssl"] == {}
    assert config["singleton_backend_kwargs"] == {}


def test_tls_urls_verify_certificate_and_host_by_default() -> None:
    settings = Settings(
        broker_url="amqps://u:p@broker.example:5671/v", redis_url="rediss://r.example:6380/0"
    )
    config = celery_config(settings)
    assert config["broker_use_ssl"] == {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None}
    verified = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    assert config["redis_backend_use_ssl"] == verified
    assert config["singleton_backend_kwargs"] == verified


def test_ca_and_client_certificate_reach_both_libraries(pem: Path) -> None:
    settings = Settings(
        broker_url="amqps://broker.example/v",
        redis_url="rediss://r.example/0",
        tls_ca_file=pem,
        tls_cert_file=pem,
        tls_key_file=pem,
    )
    amqp = broker_ssl(settings)
    assert isinstance(amqp, dict)
    assert (amqp["ca_certs"], amqp["certfile"], amqp["keyfile"]) == (str(pem),) * 3
    options = redis_ssl(settings, "rediss://r.example/0")
    assert (options["ssl_ca_certs"], options["ssl_certfile"], options["ssl_keyfile"]) == (
        str(pem),
    ) * 3
    # A result backend that is not rediss:// gets nothing, or Celery would force TLS on it.
    assert redis_ssl(settings, "redis://r.example/1") == {}


def test_settings_refuse_what_cannot_work(pem: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="AVOCADO_TLS_KEY_FILE needs AVOCADO_TLS_CERT_FILE"):
        Settings(tls_key_file=pem)
    with pytest.raises(ValidationError, match="mix schemes"):
        Settings(broker_url="amqps://a.example//;amqp://b.example//")
    with pytest.raises(ValidationError, match="tls_ca_file"):
        Settings(tls_ca_file=tmp_path / "missing.pem")


def test_plaintext_to_another_host_warns_once_without_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(
        broker_url="amqp://worker:s3cret-pw@10.9.8.7:5672/v",
        redis_url="redis://:r3dis-pw@10.9.8.6:6379/0",
    )
    with caplog.at_level("WARNING", logger="avocado_shared.tls"):
        celery_config(settings)
        celery_config(settings)
        celery_config(Settings(broker_url="amqp://guest:guest@localhost//"))
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "broker amqp://10.9.8.7:5672 is plaintext across the network: use amqps:// "
        "(docs/configuration.md, TLS)",
        "result backend redis://10.9.8.6:6379 is plaintext across the network: use rediss:// "
        "(docs/configuration.md, TLS)",
    ]
    assert "pw" not in caplog.text


def test_only_a_certificate_failure_stops_the_retries() -> None:
    failure = ssl.SSLCertVerificationError(1, "certificate verify failed")
    failure.verify_message = "self-signed certificate"
    wrapped = ConnectionError("connect failed")
    wrapped.__cause__ = failure
    with pytest.raises(CertificateError, match="did not verify: self-signed certificate"):
        refuse_untrusted(wrapped, 1.0)
    refuse_untrusted(ConnectionRefusedError(111, "refused"), 1.0)  # retried as before
