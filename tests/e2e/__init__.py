"""End-to-end tests: agent processes in the lab, the CNI chain, the installed wheel (root)."""
