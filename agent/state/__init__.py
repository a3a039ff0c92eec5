"""What the agent knows about the mesh: plain data, fed by sources (local file, Kubernetes)."""
