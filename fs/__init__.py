"""The filesystem: a kernel-free core and a thin pyfuse3 adapter over it."""
