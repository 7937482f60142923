"""Datasets: pins and manifests, prefetch, kernel-served trees, their binds and checks.

Imports cache, store and base.
"""
