"""The DNS proxy for enrolled pods: mesh Service names answered here, everything else
forwarded to the nameserver the pod asked (ztunnel's DNS proxy)."""
