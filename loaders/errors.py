class LoadError(RuntimeError):
    """A model file or folder could not be used. The message names the file and says what to do."""


# ComfyUI shows an error's module path to the user; ours would be the pack's install path.
LoadError.__module__ = "beyond_clip"
