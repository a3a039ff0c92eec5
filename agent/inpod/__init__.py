"""Work done inside an enrolled pod's network namespace: sockets, routing, sysctls."""
