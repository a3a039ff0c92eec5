"""TLS 1.3 cipher suite order for HBONE: AES-128-GCM first, as Envoy (BoringSSL) and ztunnel
(rustls) order them.

OpenSSL's default puts AES-256-GCM first, which costs about a third more CPU per byte here for
no gain that matters inside a mesh (both are 128-bit secure or better against every known
attack). A TLS 1.3 client states its preference and the server takes it, so the order of the
agent's contexts decides every HBONE connection between agents.

Python 3.11's `ssl` cannot set TLS 1.3 suites (`set_ciphers` is TLS 1.2 only), and OpenSSL's
config file is read once per process, before the agent can change it. So the one OpenSSL call
that does it, `SSL_CTX_set_ciphersuites`, is made through ctypes on the context's `SSL_CTX`,
which CPython keeps as the first field after the object header. The pointer is checked first
(OpenSSL must report the options Python reports for the same context); when anything does not
hold, the context keeps OpenSSL's order and `prefer_aes_128` says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import ssl
import sys

HBONE_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
FIRST = "TLS_AES_128_GCM_SHA256"


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
    except (OSError, AttributeError):
        return None
    return lib


def prefer_aes_128(context: ssl.SSLContext) -> bool:
    """Put AES-128-GCM first among the context's TLS 1.3 suites. False (the context left as
    it was) where it cannot be done safely."""
    lib = _libssl()
    if lib is None:
        return False
    ctx = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not ctx or lib.SSL_CTX_get_options(ctx) != int(context.options):
        return False
    if lib.SSL_CTX_set_ciphersuites(ctx, HBONE_CIPHERSUITES.encode()) != 1:
        return False
    return context.get_ciphers()[0]["name"] == FIRST
