"""amiforge: the whole life of golden machine images, from a recipe to retirement."""

__version__ = "0.1.0"
