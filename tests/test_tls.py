"""Tests for application.tls: the context a rediss:// URL asks for (over the wire, see
test_probes.py; as a start-up error, test_config.py)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from application.tls import tls_context


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", (ssl.CERT_REQUIRED, True)),
        ("?ssl_cert_reqs=none", (ssl.CERT_NONE, False)),
        ("?ssl_cert_reqs=Optional", (ssl.CERT_OPTIONAL, True)),
        ("?ssl_check_hostname=no", (ssl.CERT_REQUIRED, False)),
        ("?ssl_cert_reqs=required&ssl_check_hostname=1", (ssl.CERT_REQUIRED, True)),
    ],
)
def test_tls_context_follows_the_parameters(query: str, expected: tuple[ssl.VerifyMode, bool]):
    """Certificates required and host names checked by default; each can be relaxed."""
    context = tls_context(f"rediss://cache{query}")
    assert (context.verify_mode, context.check_hostname) == expected


def test_tls_context_adds_the_given_ca_to_the_system_ones(ca_file: Path):
    """ssl_ca_certs adds its CA, as redis-py does: one more CA than the default context."""
    default = len(ssl.create_default_context().get_ca_certs())
    given = tls_context(f"rediss://cache?ssl_ca_certs={ca_file}").get_ca_certs()
    assert len(given) == default + 1


@pytest.mark.parametrize("query", ["ssl_check_hostname=", "ssl_cert_reqs=", "ssl_ca_certs="])
def test_a_blank_tls_parameter_is_refused(query: str):
    """`?ssl_check_hostname=` and the like are no answer: refused, not read as a default."""
    with pytest.raises(ValueError, match=query.rstrip("=")):
        tls_context(f"rediss://cache?{query}")
