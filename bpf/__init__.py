"""The datapath's eBPF programs, in C: not Python, shipped with the agent as package data.

A package only so that the C files travel inside the wheel: agent/datapath/abi.py finds this
directory with importlib.resources (the repository's bpf/ in an editable install, the copy in
site-packages otherwise), and BCC compiles the programs from it when the agent starts.
"""
