"""The benchmarks: the data path against no mesh on the lab, and the L4 policy compiler and
kernel decision cost. `ambient-agent bench` runs them (docs/performance.md)."""
