"""Device memory: backends that measure it, the linear memory model, the ceiling search."""
