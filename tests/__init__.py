"""netprobe's tests (a package, so helpers can be imported)."""
