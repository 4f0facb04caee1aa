"""Errors that name their fix. Every user-facing failure in ppd raises one of these."""


class PPDError(Exception):
    """Base class: the message says what went wrong and how to fix it."""


class ModelLoadError(PPDError):
    """A model spec could not be turned into a model + tokenizer."""


class TaskDataError(PPDError):
    """Task data is missing, unreadable, or lacks a field a prompt needs."""


class PromptTooLongError(PPDError):
    """A prompt (plus the tokens to generate) does not fit the configured budget or the model's context."""


class HeadMismatchError(PPDError):
    """An early-exit head file does not belong to this model or layer."""


class ConfigError(PPDError, ValueError):
    """A setting out of its range (a ValueError too, as the standard library would raise)."""


def run_cli(main, prog: str, *args, **kwargs):
    """Run a command-line tool's ``main``: a user's mistake (a ``PPDError``, whose message names the fix) becomes
    one line on stderr and exit code 2; any other error keeps its traceback."""
    import sys

    try:
        return main(*args, **kwargs)
    except PPDError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
