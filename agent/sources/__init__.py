"""What feeds the mesh state: the local config file, the Kubernetes API, and the pods
ambient-cni announces (its registry and socket). Each builds whole MeshState snapshots."""
