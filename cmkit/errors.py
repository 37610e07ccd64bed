"""The exceptions the CLI turns into a one-line message and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: a value, a file or a run directory that cannot be used.

    Raised at public boundaries with a message naming the bad value and what was expected,
    so the CLI can print it on one line instead of a traceback from deep inside torch.
    """


class OptionError(UserError):
    """A bad value of one named option (a field of an options dataclass, e.g. "batch_size").

    The library says "batch_size must be > 0, got 0"; a front end names the option its own
    way (the CLI: "--batch-size must be > 0, got 0") from `option` and `problem`.
    """

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option} {problem}")
        self.option, self.problem = option, problem
