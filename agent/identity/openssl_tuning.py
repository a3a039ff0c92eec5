"""What HBONE's TLS contexts need from OpenSSL that Python's `ssl` cannot set: the TLS 1.3
cipher suite order, and read-ahead.

Suites: AES-128-GCM first, as Envoy (BoringSSL) and ztunnel (rustls) order them. OpenSSL's
default puts AES-256-GCM first, which costs about a third more CPU per byte here for no gain
that matters inside a mesh (both are 128-bit secure or better against every known attack). A
TLS 1.3 client states its preference and the server takes it, so the order of the agent's
contexts decides every HBONE connection between agents. Python 3.11's `set_ciphers` is TLS
1.2 only, and OpenSSL's config file is read once per process, before the agent could change
it: `SSL_CTX_set_ciphersuites` does it.

Read-ahead: without it OpenSSL reads a record's 5-byte header, then its body, two system
calls per 16 KiB record. With it, and a read buffer of READ_BUFFER, one call takes in as
many records as have arrived; the receiving agent's kernel time per byte fell by a third
(docs/performance.md). The transport (agent/hbone/tls_transport.py) never relies on the
socket signalling bytes OpenSSL has already taken in.

The calls are made through ctypes on the context's `SSL_CTX`, which CPython keeps as the
first field after the object header. The pointer is checked first (OpenSSL must report the
options Python reports for the same context); when anything does not hold, the context is
left as it was and the function says so (False).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import ssl
import sys

HBONE_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
FIRST = "TLS_AES_128_GCM_SHA256"
READ_BUFFER = 256 * 1024
# openssl/ssl.h: SSL_CTX_set_read_ahead and SSL_CTX_get_read_ahead are macros over these.
_SSL_CTRL_GET_READ_AHEAD = 40
_SSL_CTRL_SET_READ_AHEAD = 41


@functools.cache
def _libssl() -> ctypes.CDLL | None:
    if sys.implementation.name != "cpython" or not ssl.OPENSSL_VERSION.startswith("OpenSSL 3"):
        return None
    try:
        # The same library _ssl is linked against: it is loaded already, so this is that copy.
        lib = ctypes.CDLL(ctypes.util.find_library("ssl") or "libssl.so.3")
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
        lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        lib.SSL_CTX_set_default_read_buffer_len.restype = None
        lib.SSL_CTX_set_default_read_buffer_len.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return lib


def _ssl_ctx(lib: ctypes.CDLL, context: ssl.SSLContext) -> int | None:
    """The context's SSL_CTX pointer, when OpenSSL confirms it is that context's."""
    ctx = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not ctx or lib.SSL_CTX_get_options(ctx) != int(context.options):
        return None
    return ctx


def prefer_aes_128(context: ssl.SSLContext) -> bool:
    """Put AES-128-GCM first among the context's TLS 1.3 suites. False (the context left as
    it was) where it cannot be done safely."""
    lib = _libssl()
    ctx = _ssl_ctx(lib, context) if lib is not None else None
    if lib is None or ctx is None:
        return False
    if lib.SSL_CTX_set_ciphersuites(ctx, HBONE_CIPHERSUITES.encode()) != 1:
        return False
    return context.get_ciphers()[0]["name"] == FIRST


def read_ahead(context: ssl.SSLContext, buffer: int = READ_BUFFER) -> bool:
    """Let OpenSSL read the socket ahead of the record it needs, into a `buffer`-byte read
    buffer. False (the context left as it was) where it cannot be done safely."""
    lib = _libssl()
    ctx = _ssl_ctx(lib, context) if lib is not None else None
    if lib is None or ctx is None:
        return False
    lib.SSL_CTX_set_default_read_buffer_len(ctx, buffer)
    lib.SSL_CTX_ctrl(ctx, _SSL_CTRL_SET_READ_AHEAD, 1, None)
    return bool(lib.SSL_CTX_ctrl(ctx, _SSL_CTRL_GET_READ_AHEAD, 0, None))
