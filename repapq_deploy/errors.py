"""The one exception type the CLI turns into a one-line error and a non-zero exit code."""


class DeployError(Exception):
    """A user-facing failure: the message names the file or option and says what to do."""
