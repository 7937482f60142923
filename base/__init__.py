"""The bottom layer: the error tree and its errno table, settings, log setup.

Imports nothing of ours.
"""
