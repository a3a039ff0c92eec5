"""The waypoint: L7 for Services bound to it, through Envoy (issue 13)."""
