"""Generation loops over the tiered cache: the engine's decode loop and token sampling."""
