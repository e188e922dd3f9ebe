"""hatched-mirror: a webhook-driven mirror of Hatched buddies."""

__version__ = "0.1.0"
