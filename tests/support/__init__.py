"""Helpers the tests share: the in-process mesh, the fake Kubernetes API, the OTLP receiver,
the policy cases and their reference semantics, the fault-injecting agent driver."""
