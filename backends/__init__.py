"""Store implementations, one module per technology (imported lazily by omniq.registry)."""
