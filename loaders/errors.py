"""The pack's errors (defined in bridges/errors.py, which everything may import)."""
from ..bridges.errors import InputError, LoadError, PackError

__all__ = ["InputError", "LoadError", "PackError"]
