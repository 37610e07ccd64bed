"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: a value, a file or a run directory that cannot be used.

    Raised at public boundaries with a message naming the bad value and what was expected,
    so the CLI can print it on one line instead of a traceback from deep inside torch.
    """
