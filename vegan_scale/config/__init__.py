"""Configuration: the typed schema's building blocks and the YAML/override loader."""
