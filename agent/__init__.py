"""ambient-agent: node agent of an Istio-ambient-style mesh with an eBPF datapath."""
