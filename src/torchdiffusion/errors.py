"""Project error types: one line for the user, a documented exit code for the CLI.

The exit codes of every `torchdiffusion` command (EXIT_CODES; docs/cli.md has the same table):

    0    done
    1    refused: data, a checkpoint, an output folder, out of memory (DataError, CheckpointError, OutputError)
    2    usage: a config key or value, a command-line option or argument (ConfigError; click's usage errors)
    75   `train` stopped by SIGTERM or SIGINT after saving a resumable checkpoint (EX_TEMPFAIL of sysexits.h)
    130  interrupted (Ctrl-C, 128 + SIGINT) in any other command; nothing half-written is left as a result
"""

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130

#: exit code -> what it means (the table above)
EXIT_CODES = {
    EXIT_OK: "done",
    EXIT_REFUSED: "refused: data, a checkpoint, an output folder, out of memory",
    EXIT_USAGE: "usage: a config key or value, a command-line option or argument",
    EXIT_PREEMPTED: "train stopped by SIGTERM/SIGINT after saving a resumable checkpoint",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C) in any other command",
}


class TorchDiffusionError(Exception):
    """Base of every error the project raises on purpose; its message is one line that teaches."""

    exit_code = EXIT_REFUSED


class ConfigError(TorchDiffusionError):
    """A configuration key, type or value is invalid."""

    exit_code = EXIT_USAGE


class DataError(TorchDiffusionError):
    """A data set or data file cannot be used."""

    exit_code = EXIT_REFUSED


class CheckpointError(TorchDiffusionError):
    """A checkpoint or weights file is missing, damaged or untrusted."""

    exit_code = EXIT_REFUSED


class OutputError(TorchDiffusionError):
    """An output folder or file cannot be written without mixing with, or losing, earlier results."""

    exit_code = EXIT_REFUSED
