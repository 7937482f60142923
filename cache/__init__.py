"""The on-disk block cache: layout, index, verified blocks, fetches, eviction, pins.

Imports store and base.
"""
