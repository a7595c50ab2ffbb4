"""TLS settings: environment names, validation, what reaches kombu, Celery pass-through."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from celery import Celery

from brama_mq.celery.runtime import app_settings
from brama_mq.settings import Settings, SettingsError
from brama_mq.transport.amqp import AmqpTransport


@pytest.fixture
def pem(tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    path.write_text("not parsed here")
    return str(path)


def test_plain_url_has_no_tls() -> None:
    """No amqps:// and no option: no ssl argument at all."""
    s = Settings.from_env({}, broker_url="amqp://u:p@h:5672//")
    assert not s.tls and s.ssl_options() is None and s.transport_options() == {"heartbeat": 10.0}


def test_amqps_url_verifies_chain_and_host_name() -> None:
    """amqps:// alone: TLS with certificate and host-name verification (system CAs)."""
    s = Settings.from_env({}, broker_url="amqps://u:p@h:5671//")
    assert s.ssl_options() == {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None}


def test_environment_names(pem: str) -> None:
    """BRAMA_TLS_CA_FILE, _CERT_FILE, _KEY_FILE and _VERIFY fill the options."""
    s = Settings.from_env({"BRAMA_TLS_CA_FILE": pem, "BRAMA_TLS_CERT_FILE": pem,
                           "BRAMA_TLS_KEY_FILE": pem, "BRAMA_TLS_VERIFY": "false"})
    assert s.ssl_options() == {"cert_reqs": ssl.CERT_NONE, "ca_certs": pem,
                               "certfile": pem, "keyfile": pem}
    assert Settings.from_env({"BRAMA_TLS_VERIFY": "false"}, tls_verify=True).tls_verify


@pytest.mark.parametrize(("env", "named"), [
    ({"BRAMA_TLS_VERIFY": "maybe"}, "BRAMA_TLS_VERIFY"),
    ({"BRAMA_TLS_CA_FILE": "/nonexistent/ca.pem"}, "tls_ca_file"),
    ({"BRAMA_TLS_KEY_FILE": __file__}, "tls_cert_file"),
])
def test_bad_tls_settings_name_the_setting(env: dict[str, str], named: str) -> None:
    """A bad value fails at once, naming the variable or setting."""
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


def test_transport_gets_a_fresh_copy_per_connection(pem: str) -> None:
    """kombu writes server_hostname into the dict; every connection gets its own copy."""
    opts = Settings.from_env({}, broker_url="amqps://u:p@h//", tls_ca_file=pem).ssl_options()
    t = AmqpTransport("amqps://u:p@h//", ssl=opts)
    a, b = t.new_kombu_connection(), t.new_kombu_connection()
    assert a.ssl == opts and a.ssl is not b.ssl and a.ssl is not opts


def test_celery_broker_use_ssl_passes_through(pem: str) -> None:
    """Sharing Celery's broker: broker_use_ssl becomes brama_mq's TLS settings;
    brama_tls_* settings win over it."""
    app = Celery("t", broker="amqps://u:p@h:5671//")
    app.conf.broker_use_ssl = {"ca_certs": pem, "cert_reqs": ssl.CERT_NONE}
    s = app_settings(app)["settings"]
    assert s.tls_ca_file == pem and s.tls_verify is False and s.tls
    app.conf.brama_tls_verify = True
    assert app_settings(app)["settings"].tls_verify is True
