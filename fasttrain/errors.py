"""The one exception type for bad user input.

Anything a user can fix (a config typo, a missing data folder, a broken checkpoint) raises
`UserError` with a one-line message that names what is wrong and how to fix it. The entry
points turn it into `fasttrain: error: ...` on stderr and exit code 2, without a traceback.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class ConfigError(UserError):
    """A config key, type or value that is not accepted."""
