"""The command line (``netchan ...``) and its demos, on top of every layer.

Imports from any layer below; nothing imports it.
"""

from .main import main

__all__ = ["main"]
