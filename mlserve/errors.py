"""The errors the core raises. They carry no HTTP status: ``mlserve.api.errors`` alone maps them."""

from __future__ import annotations


class MlserveError(Exception):
    """Base of every error a client or operator may see; its message is safe to show."""


class SettingsError(MlserveError):
    """A settings file, variable or flag is invalid."""


class RepositoryError(MlserveError):
    """The model repository on disk holds something that cannot be served."""


class BadRequest(MlserveError):
    """The request cannot be parsed at all (malformed JSON, bad header)."""


class ValidationFailed(MlserveError):
    """The request parsed but a value is wrong; ``path`` is the JSON path of the fault."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class PayloadTooLarge(MlserveError):
    """A body or a batch is over its configured limit."""


class UnsupportedMediaType(MlserveError):
    """The body is of a type or an image format the server does not take."""


class ModelNotFound(MlserveError):
    """No such model or version in the repository."""


class Conflict(MlserveError):
    """The change asked for contradicts the current state (unloading the active version)."""


class LoadFailed(MlserveError):
    """A version could not be loaded or warmed; the message says why, and the active version serves on."""


class RegistryUnavailable(MlserveError):
    """The MLflow registry could not say where a model's alias points; what serves keeps serving."""


class StateUnavailable(MlserveError):
    """The state store could not record a change, so the change was not made."""

    retry_after_s = 1


class Unauthorized(MlserveError):
    """A mutating admin route was called without the right bearer token."""


class Forbidden(MlserveError):
    """A mutating admin route is closed: the server listens beyond loopback and has no admin token."""


class ModelNotReady(MlserveError):
    """The version exists but is still loading (worth retrying) or failed to load (not worth it)."""

    def __init__(self, message: str, retry_after_s: int | None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(MlserveError):
    """The batcher's bounded queue is full; the caller should retry after a short pause."""

    retry_after_s = 1


class Overloaded(MlserveError):
    """The requests queued ahead would keep this one past its deadline: refused now rather than
    timed out later, with when the queue will have room again."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(MlserveError):
    """The request's deadline passed before its result arrived."""


class ComputeTimedOut(DeadlineExceeded):
    """The model computed the batch for longer than its ``max_compute_s``; its worker was replaced."""


class ShuttingDown(MlserveError):
    """The server is stopping and no longer takes work; another replica may."""

    retry_after_s = 1


class WorkerUnavailable(MlserveError):
    """No worker could run the batch (none is alive, or the batch killed two workers in a row and is
    not tried on a third)."""

    retry_after_s = 1


class PredictionFailed(MlserveError):
    """The model raised, or returned the wrong number of rows, on input that passed validation."""
