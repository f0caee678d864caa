"""One exception type per failure class, so a CLI can print a message instead of a stack trace, and exit with a
code that tells a script which class it was (docs/troubleshooting.md lists them). 2 is argparse's own code for a
bad command line; a config key is part of the command line, so a bad one shares it."""


class DcganError(Exception):
    """Base class: anything the user can fix by changing input, config or environment."""

    exit_code = 1

    def one_line(self) -> "DcganError":
        """The same error with only its own message: raised in another process (a DataLoader worker, a Ray Train
        worker), its text arrives as that process's whole traceback, which ends with `...Error: <message>`."""
        last = str(self).strip().splitlines()[-1] if str(self).strip() else ""
        return type(self)(last.split(f"{type(self).__name__}: ", 1)[-1])


class ConfigError(DcganError):
    """A config key is unknown, has the wrong type, or an invalid value."""

    exit_code = 2


class DataError(DcganError):
    """Shards, manifests or source images are missing, empty or unreadable."""

    exit_code = 3


class CheckpointError(DcganError):
    """A checkpoint cannot be read or does not match the model."""

    exit_code = 4


class TrackingError(DcganError):
    """MLflow cannot be reached or a model URI does not resolve."""

    exit_code = 5


class RunBusy(DcganError):
    """Another job holds the run name's lease, or took it over from this one (which then stops writing)."""

    exit_code = 6


class Stopped(DcganError):
    """Training was asked to stop (SIGTERM, `ray job stop`): not a failure of input, but not a finished run."""

    exit_code = 143  # 128 + SIGTERM, as a shell reports a process ended by it
