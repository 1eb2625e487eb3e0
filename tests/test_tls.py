"""Tests for application.tls: the context a rediss:// URL asks for (over the wire, see
test_probes.py; as a start-up error, test_config.py)."""

from __future__ import annotations

import contextlib
import ssl
import subprocess
from pathlib import Path

import pytest
import trustme

from application.tls import tls_context


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", (ssl.CERT_REQUIRED, True)),
        ("?ssl_cert_reqs=none", (ssl.CERT_NONE, False)),
        ("?ssl_cert_reqs=Optional", (ssl.CERT_OPTIONAL, True)),
        ("?ssl_check_hostname=no", (ssl.CERT_REQUIRED, False)),
        ("?ssl_cert_reqs=required&ssl_check_hostname=1", (ssl.CERT_REQUIRED, True)),
        ("?db=0&ssl_cert_reqs=none", (ssl.CERT_NONE, False)),  # read past the client's own
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


@pytest.mark.parametrize(
    ("word", "checked"),
    [(word, True) for word in ("1", "true", "yes", "on", "TRUE", "On")]
    + [(word, False) for word in ("0", "false", "no", "off", "FALSE", "Off")],
)
def test_ssl_check_hostname_takes_config_words_for_true_and_false(word: str, checked: bool):
    """config.py's words for a boolean, in any case."""
    context = tls_context(f"rediss://cache?ssl_check_hostname={word}")
    assert context.check_hostname is checked


def test_parameters_not_about_tls_are_left_to_the_apps_client():
    """`socket_timeout`, `db` and the like change nothing: the defaults, and no error."""
    context = tls_context("rediss://cache?socket_timeout=5&db=0&health_check_interval=10")
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)


# Each bad URL query, and the whole message: the parameter named, never its value.
BAD_QUERIES = [
    ("ssl_cert_reqs=sometimes", "ssl_cert_reqs: expected none, optional or required"),
    ("ssl_check_hostname=maybe", "ssl_check_hostname: expected true or false"),
    (
        "ssl_cert_reqs=none&ssl_check_hostname=true",
        "ssl_check_hostname: needs ssl_cert_reqs=optional or required",
    ),
    ("ssl_cert_reqs=none&ssl_cert_reqs=none", "ssl_cert_reqs: given twice"),
    (
        "ssl_ca_cert=x",
        "unknown parameter 'ssl_ca_cert' (expected ssl_ca_certs, ssl_ca_path, ssl_cert_reqs, "
        "ssl_certfile, ssl_keyfile, ssl_check_hostname)",
    ),
    ("ssl_ca_path=/nonexistent/secret", "ssl_ca_path: expected a directory"),
    ("ssl_keyfile=/nonexistent/secret.pem", "ssl_keyfile: needs ssl_certfile"),
    (
        "ssl_ca_certs=/nonexistent/secret.pem",
        "ssl_ca_certs: cannot load it (No such file or directory)",
    ),
    ("ssl_ca_certs=/etc/hostname", "ssl_ca_certs: cannot load it (no certificate or crl found)"),
    (
        "ssl_certfile=/nonexistent/secret.pem",
        "ssl_certfile: cannot load it (No such file or directory)",
    ),
    ("ssl_certfile=/etc/hostname", "ssl_certfile: cannot load it (not PEM)"),
]


@pytest.mark.parametrize(("query", "message"), BAD_QUERIES)
def test_a_bad_tls_parameter_is_named_with_what_was_expected(query: str, message: str):
    """One ValueError a start-up line can carry: what is wrong, in words that carry no path."""
    with pytest.raises(ValueError) as raised:
        tls_context(f"rediss://cache?{query}")
    assert str(raised.value) == message


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server(ca: trustme.CA) -> ssl.SSLContext:
    """A server's TLS context: a certificate for cache.test from the private CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("cache.test").configure_cert(context)
    return context


def handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> ssl.SSLObject:
    """A real TLS handshake between two contexts, in memory, to `cache.test`.

    Raises what either side raises; returns the server's side, which knows the client's
    certificate.
    """
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    sides = [
        client.wrap_bio(to_client, to_server, server_hostname="cache.test"),
        server.wrap_bio(to_server, to_client, server_side=True),
    ]
    pending = list(sides)
    for _ in range(10):  # a handshake is a few round trips
        for side in list(pending):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
                pending.remove(side)
        if not pending:
            return sides[1]
    raise AssertionError("the handshake never ended")


def test_the_default_context_rejects_a_private_ca(server: ssl.SSLContext):
    """Only the system's CAs by default: a private CA's server certificate is rejected."""
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tls_context("rediss://cache.test"), server)


def test_ssl_ca_certs_trusts_a_private_ca(ca: trustme.CA, server: ssl.SSLContext, tmp_path):
    """A CA bundle given as a file: the server's certificate is trusted."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    handshake(tls_context(f"rediss://cache.test?ssl_ca_certs={tmp_path / 'ca.pem'}"), server)


def test_ssl_ca_path_trusts_a_private_ca(ca: trustme.CA, server: ssl.SSLContext, tmp_path):
    """A directory of CAs named by their hash (`openssl rehash`): the certificate is trusted."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    subprocess.run(["openssl", "rehash", str(tmp_path)], check=True)
    handshake(tls_context(f"rediss://cache.test?ssl_ca_path={tmp_path}"), server)


@pytest.fixture
def wants_client_certificates(ca: trustme.CA) -> ssl.SSLContext:
    """A server that asks every client for a certificate from the private CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("cache.test").configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def test_a_client_certificate_and_key_in_one_file_need_no_keyfile(
    ca: trustme.CA, wants_client_certificates: ssl.SSLContext, tmp_path
):
    """ssl_certfile alone, holding the key too (or with a blank ssl_keyfile): presented."""
    client = ca.issue_cert("client@example.com")
    client.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    query = f"ssl_ca_certs={tmp_path / 'ca.pem'}&ssl_certfile={tmp_path / 'client.pem'}"
    for blank in ("", "&ssl_keyfile="):
        server_side = handshake(
            tls_context(f"rediss://cache.test?{query}{blank}"), wants_client_certificates
        )
        assert server_side.getpeercert()
