"""Workload identity for the mesh: SPIFFE IDs, a built-in CA, per-service-account certificates
with rotation, and the TLS 1.3 mutual-TLS contexts and peer checks HBONE uses."""
