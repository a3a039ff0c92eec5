"""L4 authorization: Istio AuthorizationPolicy semantics, compiled into kernel maps."""
