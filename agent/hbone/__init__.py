"""HBONE: TCP streams tunnelled as HTTP/2 CONNECT over mutual TLS (port 15008)."""
