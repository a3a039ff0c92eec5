"""The agent's in-pod listeners: what happens to the connections the tc programs capture."""
