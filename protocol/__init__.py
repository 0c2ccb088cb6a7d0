"""comfy-progress's sans-IO core.

Everything here is pure and synchronous: bytes, text and dicts go in, typed
events, new states and messages come out. No event loop, sockets, files or
clock reads (``now`` is always an argument); ``protocol/ruff.toml`` enforces it.
"""
