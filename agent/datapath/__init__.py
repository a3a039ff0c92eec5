"""The kernel side: compiling, pinning and attaching the tc programs, and their maps."""
