"""Test support shipped with the package but never imported by the runtime path:
the in-memory store and sessions that drive the core and a mount alike.

May import every layer below cli.
"""
