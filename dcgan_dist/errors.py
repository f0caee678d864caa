"""One exception type per failure class, so a CLI can print a message instead of a stack trace."""


class DcganError(Exception):
    """Base class: anything the user can fix by changing input, config or environment."""


class ConfigError(DcganError):
    """A config key is unknown, has the wrong type, or an invalid value."""


class DataError(DcganError):
    """Shards, manifests or source images are missing, empty or unreadable."""


class CheckpointError(DcganError):
    """A checkpoint cannot be read or does not match the model."""


class TrackingError(DcganError):
    """MLflow cannot be reached or a model URI does not resolve."""


class Stopped(DcganError):
    """Training was asked to stop (SIGTERM, `ray job stop`): not a failure of input, but not a finished run."""
