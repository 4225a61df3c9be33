"""Model families. Each registers a :class:`megaray.models.registry.ModelSpec`."""
