"""TLS: the client context a `rediss://` URL asks for, by redis-py's parameter names.

redis-py's names are the de-facto convention for Redis URLs, so one URL serves the app's
client and this service's probe alike.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from urllib.parse import parse_qsl, urlsplit

TLS_PARAMETERS = (
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_cert_reqs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_check_hostname",
)
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_TRUE = ("1", "true", "yes", "on")  # config.py's words for a boolean, but blank is no answer
_FALSE = ("0", "false", "no", "off")


def tls_context(url: str) -> ssl.SSLContext:
    """The client TLS context a `rediss://` URL asks for through its `ssl_*` parameters.

    By default the system's CAs, a required certificate and a checked host name (redis-py
    6's defaults); `ssl_ca_certs` / `ssl_ca_path` add a private CA, as redis-py does. Raises
    ValueError naming the parameter, never its value.
    """
    given = tls_parameters(url)
    cert_reqs = given.get("ssl_cert_reqs", "required").lower()
    if cert_reqs not in _CERT_REQS:
        raise ValueError("ssl_cert_reqs: expected none, optional or required")
    check_hostname = cert_reqs != "none"
    if "ssl_check_hostname" in given:
        check_hostname = _flag("ssl_check_hostname", given["ssl_check_hostname"])
        if check_hostname and cert_reqs == "none":
            raise ValueError("ssl_check_hostname: needs ssl_cert_reqs=optional or required")
    context = ssl.create_default_context()
    context.check_hostname = check_hostname
    context.verify_mode = _CERT_REQS[cert_reqs]
    if "ssl_ca_certs" in given:
        _load("ssl_ca_certs", context.load_verify_locations, cafile=given["ssl_ca_certs"])
    if "ssl_ca_path" in given:
        if not os.path.isdir(given["ssl_ca_path"]):
            raise ValueError("ssl_ca_path: expected a directory")
        context.load_verify_locations(capath=given["ssl_ca_path"])
    if "ssl_keyfile" in given and "ssl_certfile" not in given:
        raise ValueError("ssl_keyfile: needs ssl_certfile")
    if "ssl_certfile" in given:
        keyfile = given.get("ssl_keyfile") or None
        _load("ssl_certfile", context.load_cert_chain, given["ssl_certfile"], keyfile)
    return context


def tls_parameters(url: str) -> dict[str, str]:
    """The URL's `ssl_*` parameters: known names, each given once; others are the client's."""
    given: dict[str, str] = {}
    for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if not name.startswith("ssl_"):
            continue  # socket_timeout, db, ...: how the app's client behaves, not the server
        if name not in TLS_PARAMETERS:
            raise ValueError(f"unknown parameter {name!r} (expected {', '.join(TLS_PARAMETERS)})")
        if name in given:
            raise ValueError(f"{name}: given twice")
        given[name] = value
    return given


def _flag(name: str, raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"{name}: expected true or false")


def _load(name: str, load: Callable[..., None], *args: str | None, **kwargs: str) -> None:
    """Load a file into a TLS context; the error says why in words that carry no path."""
    try:
        load(*args, **kwargs)
    except ssl.SSLError as error:
        # OpenSSL's reason, as words ("no certificate or crl found"); none for a key or
        # certificate file that is not PEM at all ("PEM lib").
        reason = error.reason.lower().replace("_", " ") if error.reason else "not PEM"
        raise ValueError(f"{name}: cannot load it ({reason})") from None
    except OSError as error:
        raise ValueError(f"{name}: cannot load it ({error.strerror or 'unreadable'})") from None
