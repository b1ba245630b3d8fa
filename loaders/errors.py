class LoadError(RuntimeError):
    """A model file or folder could not be used. The message names the file and says what to do."""
