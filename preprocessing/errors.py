"""The one exception type that means "the user asked for something we cannot do".

The CLI prints it as a single line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class PreprocessingError(Exception):
    """An unusable input, option or output location, explained in one line."""
