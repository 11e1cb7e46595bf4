"""avatalk: a real-time talking-avatar conversation server."""

__version__ = "0.1.0"
