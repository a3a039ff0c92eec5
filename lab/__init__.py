"""A local cluster of Kubernetes-like nodes and pods made of Linux network namespaces."""
