"""Wire parsing in the egress proxy: the TLS ClientHello's server name."""

from __future__ import annotations

import ssl

from cellbox.egress.proxy import tls_server_name


def client_hello(server_name: str | None) -> bytes:
    """A real TLS ClientHello from this Python's ssl module."""
    context = ssl.create_default_context()
    context.check_hostname = server_name is not None
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def test_tls_server_name_parser() -> None:
    assert tls_server_name(client_hello("files.pythonhosted.org")) == "files.pythonhosted.org"
    assert tls_server_name(client_hello(None)) is None
    assert tls_server_name(b"GET / HTTP/1.1\r\n\r\n") is None
    assert tls_server_name(b"\x16\x03\x01") is None
    hello = client_hello("a.example")
    for cut in (6, 40, 80):
        assert tls_server_name(hello[:cut]) is None
