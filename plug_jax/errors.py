"""Bad input from the user, as opposed to a bug.

Every command (`plug_jax.cli.run`) turns a `UserError` into its one-line message on stderr and
exit status 2, without a traceback; any other exception is a bug and keeps its traceback. Inputs
are checked before anything is written, so a refused command leaves its workdir as it was.
"""


class UserError(ValueError):
    """A file, flag, config field or model on disk that the command cannot use; the message is
    one line naming the file, record and field (or the flag) at fault."""


class ConfigError(UserError):
    """A config field with a value the command cannot use (an unknown task, method, source...)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the command needs is not there."""
