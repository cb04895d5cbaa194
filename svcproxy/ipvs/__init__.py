"""IPVS backends: everything that reads or writes the kernel's IPVS table."""
