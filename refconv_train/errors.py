"""The one exception type that the command-line tools print as a one-line ``error: ...``."""


class RefconvError(ValueError):
    """Bad input from the user (config, data, checkpoint, model name): the message says what and how to fix it."""
