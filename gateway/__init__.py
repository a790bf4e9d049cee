"""The service-user gateway: an async reverse proxy that checks service-user tokens and role policies."""

__version__ = "0.1.0"
