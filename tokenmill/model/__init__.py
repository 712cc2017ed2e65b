"""Model definitions, the architecture registry and the weight loader."""
