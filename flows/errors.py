"""Which errors are the user's (bad input, a bad config, a judge that refuses) and how
they are shown: as one `error:` line, without Prefect's engine traceback.

Prefect's task and flow engines log every exception with its traceback. For the
user's errors that is noise in front of the one line that says what to fix, so
``quiet_user_errors`` keeps their log line and drops the traceback; real bugs keep
theirs. ``guidedrl --debug`` (or ``GUIDEDRL_DEBUG=1``) keeps every traceback.
"""

from __future__ import annotations

import logging
import os
import warnings

DEBUG_ENV = "GUIDEDRL_DEBUG"


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that are the user's input, printed as one line."""
    from tasks.core.config import ConfigError
    from tasks.core.schemas import SchemaError
    from tasks.core.share import ShareError
    from tasks.core.shards import GenerationFailed
    from tasks.models.judge import JudgeError
    from tasks.stages.curate import SourceError

    return (ConfigError, SourceError, SchemaError, JudgeError, ShareError, GenerationFailed, FileNotFoundError, ValueError,
            PermissionError)


def is_disk_full(exc: BaseException) -> bool:
    import errno

    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn`` for stage and shard tasks: retry a failure unless it is
    bad input, a bad config or a full disk, which fail the same way again (a judge or server
    error is retried: the endpoint may come back)."""
    from tasks.core.config import ConfigError
    from tasks.core.schemas import SchemaError
    from tasks.core.share import ShareError
    from tasks.stages.curate import SourceError

    from tasks.core.shards import GenerationFailed
    from tasks.models.served import ServerError

    exc = state.data if isinstance(state.data, BaseException) else None
    # a failed generation has had the client's retries; the re-run regenerates only what failed
    return not (isinstance(exc, (ConfigError, SourceError, SchemaError, ShareError, PermissionError, GenerationFailed, ServerError)) or
                (exc is not None and is_disk_full(exc)))


class _QuietUserErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (isinstance(exc, user_errors()) or is_disk_full(exc)):
            record.exc_info, record.exc_text = None, None
        return True


_FILTER = _QuietUserErrors()


def quiet_user_errors() -> None:
    """Drop the traceback from Prefect's engine log of a user error (not with --debug)."""
    if debug():
        return
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


#: libraries whose FutureWarnings announce changes to their own API (transformers' `gradient_checkpointing_enable`
#: renamed, as TRL calls it), never anything about a user's settings: kept out of the user's output
LIBRARIES = ("transformers", "trl", "peft", "accelerate", "torch", "datasets")


def quiet_library_warnings() -> None:
    """Hide the libraries' FutureWarnings (not with --debug); a warning raised elsewhere still shows."""
    if debug():
        return
    for library in LIBRARIES:
        warnings.filterwarnings("ignore", category=FutureWarning, module=rf"{library}(\.|$)")
