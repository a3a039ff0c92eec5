# The environment variables the CNI spec requires per command (what a runtime must set),
# checked both on the spec layer and on the plugin as a runtime runs it.
REQUIRED_VARIABLES = [
    ("ADD", "CNI_CONTAINERID"),
    ("ADD", "CNI_NETNS"),
    ("ADD", "CNI_IFNAME"),
    ("CHECK", "CNI_CONTAINERID"),
    ("CHECK", "CNI_NETNS"),
    ("CHECK", "CNI_IFNAME"),
    ("DEL", "CNI_CONTAINERID"),
    ("DEL", "CNI_IFNAME"),
]
