"""Write-through: staged files and their records, uploads, left-overs after a crash.

Imports cache, store and base.
"""
