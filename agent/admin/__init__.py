"""The agent's admin endpoints: readiness (15021), Prometheus metrics (15020), config dump
(15000, loopback by default)."""
