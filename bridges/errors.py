"""The pack's own errors. ComfyUI shows an error as '<module>.<class>: message'; every pack error says
'beyond_clip.<class>' there, not the pack's install path."""


class PackError(Exception):
    """An error whose message names what is wrong (the file, the input) and says what to do."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__module__ = "beyond_clip"


PackError.__module__ = "beyond_clip"


class LoadError(PackError, RuntimeError):
    """A model file or folder could not be used."""


class InputError(PackError, ValueError):
    """A node input, prompt, picture or user file that the user can fix."""
