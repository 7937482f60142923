"""The Python API (`api.provider.DatasetProvider`): the layer beside `cli`, for programs.

A peer of `cli` at the top of the layers: it may import the daemon's client
and everything below, never `cli` (whose text it would have to parse).
"""
