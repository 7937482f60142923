"""The engine: configuration, S3 store, block cache and the app that wires them."""
