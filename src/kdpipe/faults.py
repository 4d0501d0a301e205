"""Which failures are worth retrying: transient faults, not mistakes.

A retry helps only when waiting can change the outcome: a process that was killed (an
OOM killer, a preempted node, a DDP rank that vanished), a database another process holds
locked, a network connection that dropped or timed out. It cannot help with a missing
file, pretrained weights that cannot be downloaded offline, a checkpoint that is refused
because it needs pickle, bad data, a bad config or a loss that diverged: the same inputs
fail the same way again. Those must fail at once, with their message, instead of
costing the user two more attempts and 30 s of back-off before they see it.

:func:`is_transient` decides. It walks the exception and its causes (``raise ... from``
and the implicit context) from the outside in; the first exception whose kind is known
decides. That order matters: a :class:`~kdpipe.model_registry.WeightsUnavailableError`
raised *from* a ``ConnectionError`` is permanent (being offline does not pass by
itself), while a plain ``RuntimeError`` wrapping a ``sqlite3.OperationalError:
database is locked`` is transient. Whatever is not recognised as transient is permanent.

kdpipe's own error classes are recognised by class name (anywhere in the class's MRO),
not imported: this module stays free of torch and of the modules that define them, which
may move between files without this classification changing.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator

__all__ = ["is_transient"]

# kdpipe errors whose message describes a mistake the user must fix (by class name, so
# kdpipe.config, kdpipe.model_registry, kdpipe.train... need not be imported here).
_PERMANENT_NAMES = frozenset({
    "ConfigError", "DistributedConfigError", "WeightsUnavailableError", "BundleError",
    "DataError", "TrainingDivergedError", "TrainingOOMError", "UnknownNameError",
    "PruningError", "ExportError", "ParityError", "EvaluationError", "PredictionError",
})
# Built-in kinds that no amount of waiting fixes. ValueError covers kdpipe's ValueError
# subclasses too (ConfigError, BundleError, DataError...).
_PERMANENT_TYPES = (
    FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
    pickle.UnpicklingError, ValueError, TypeError, LookupError, AttributeError,
    NotImplementedError, AssertionError, MemoryError, ImportError,
)
# torch.distributed's errors for a lost peer or a store that timed out (by name: no torch).
_TRANSIENT_NAMES = frozenset({"DistNetworkError", "DistStoreError"})
# SQLite's busy/locked errors, as sqlite3, SQLAlchemy, MLflow and kdpipe.tracking word them.
_TRANSIENT_MESSAGE = re.compile(
    r"database is locked|database table is locked|SQLITE_BUSY"
    r"|DataLoader worker \(pid.*?\) (is killed by signal|exited unexpectedly)")
# kdpipe's DistributedTrainingError.cause for a rank (or torchrun itself) that a signal
# ended, or a rank that lost its peers; a rank that raised carries its exception message.
_TRANSIENT_DDP_CAUSE = re.compile(
    r"^killed by |^torchrun exit code -\d+$|Connection (closed|reset) by peer")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a fault that a later attempt of the same work may not meet.

    Transient: ``ConnectionError``, ``TimeoutError``, SQLite "database is locked" (also
    inside MLflow's and kdpipe's wrappers), a DataLoader worker killed by a signal,
    torch.distributed's lost-peer / store-timeout errors, and kdpipe's
    ``DistributedTrainingError`` for a rank killed by a signal or cut off from its peers.

    Permanent: everything else, among them ``FileNotFoundError``, ``ValueError`` (and so
    ``ConfigError``), ``pickle.UnpicklingError`` (a checkpoint refused by
    ``torch.load(weights_only=True)``), ``WeightsUnavailableError``,
    ``TrainingDivergedError``, a DDP rank that raised, and anything not derived from
    ``Exception`` (``KeyboardInterrupt``, ``SystemExit``, ZenML's run-stopped signal).

    Args:
        exc: the exception that ended an attempt.

    Returns:
        True when retrying may succeed; False when the error must be shown at once.
    """
    for err in _chain(exc):
        if not isinstance(err, Exception):
            return False
        verdict = _verdict(err)
        if verdict is not None:
            return verdict
    return False


def _verdict(err: Exception) -> bool | None:
    """True (transient), False (permanent) or None (undecided: look at the cause)."""
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & _PERMANENT_NAMES:
        return False
    if "DistributedTrainingError" in names:
        return bool(_TRANSIENT_DDP_CAUSE.search(str(getattr(err, "cause", ""))))
    if isinstance(err, ConnectionError | TimeoutError) or names & _TRANSIENT_NAMES:
        return True
    if isinstance(err, _PERMANENT_TYPES):
        return False
    if _TRANSIENT_MESSAGE.search(str(err)):
        return True
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then its cause (or unsuppressed context), and so on; each at most once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        if current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None
