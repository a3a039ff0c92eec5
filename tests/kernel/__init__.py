"""Tests on the real kernel: programs through BPF_PROG_RUN, and the agent in-process on real
namespaces (root)."""
