"""Project error types: one line for the user, a documented exit code for the CLI."""


class TorchDiffusionError(Exception):
    """Base of every error the project raises on purpose; its message is one line that teaches."""

    exit_code = 1


class ConfigError(TorchDiffusionError):
    """A configuration key, type or value is invalid."""

    exit_code = 2


class DataError(TorchDiffusionError):
    """A data set or data file cannot be used."""

    exit_code = 1


class CheckpointError(TorchDiffusionError):
    """A checkpoint or weights file is missing, damaged or untrusted."""

    exit_code = 1


class OutputError(TorchDiffusionError):
    """An output folder or file cannot be written without mixing with, or losing, earlier results."""

    exit_code = 1
