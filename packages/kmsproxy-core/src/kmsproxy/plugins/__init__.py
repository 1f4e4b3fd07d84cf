"""Backend discovery: the hookspecs, the registry and the built-in file backend."""
