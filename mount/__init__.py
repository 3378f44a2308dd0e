"""Front ends that put a cdpfs volume in the operating system's namespace."""
