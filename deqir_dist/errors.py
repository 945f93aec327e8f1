"""The one exception type the library raises for bad input."""


class DeqirError(ValueError):
    """Bad input or an unsatisfiable request. The message is one line, fit for a CLI."""
