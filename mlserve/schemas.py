"""Wire types: every JSON body the server reads or writes, and the ``model.toml`` metadata file.

Request types forbid unknown fields so a typo (``"feature"``) is a 422, not a silently ignored key.
Decoders and encoders are built once here and shared; building them per request costs more than
decoding a small body.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from mlserve.experiments import Shadow

MAX_USER_ID_CHARS = 256
UserId = Annotated[str, msgspec.Meta(max_length=MAX_USER_ID_CHARS)]


class PredictRequest(msgspec.Struct, forbid_unknown_fields=True):
    features: list[float]
    model: str | None = None
    model_version: str | None = None
    user_id: UserId | None = None
    """Who is asking, for a sticky experiment arm (the ``X-User-ID`` header wins over it)."""


class BatchPredictRequest(msgspec.Struct, forbid_unknown_fields=True):
    samples: list[list[float]]
    model: str | None = None
    model_version: str | None = None
    user_id: UserId | None = None


class PredictResponse(msgspec.Struct, omit_defaults=True):
    prediction: Any
    """The model's own output: a class index for the demo iris models, as the seed answered."""
    model: str
    model_version: str
    inference_time_ms: float
    label: str | None = None
    """The class name, when the version's ``class_labels`` name the class index predicted."""
    variant: str | None = None
    """The version an experiment chose for this call (always present on ``/predict/ab``)."""


class BatchPredictResponse(msgspec.Struct, omit_defaults=True):
    predictions: list[Any]
    total: int
    model: str
    model_version: str
    inference_time_ms: float
    labels: list[str] | None = None
    variant: str | None = None


class ImageResponse(msgspec.Struct, omit_defaults=True):
    class_: int = msgspec.field(name="class")
    confidence: float
    probabilities: list[float]
    model: str
    model_version: str
    inference_time_ms: float
    variant: str | None = None


class ErrorResponse(msgspec.Struct, omit_defaults=True):
    error: str
    path: str | None = None


class MlflowErrorResponse(msgspec.Struct):
    """MLflow's error body, answered by its scoring protocol (``/invocations``): ``error_code`` is MLflow's
    name for the status (``BAD_REQUEST``, ``INVALID_PARAMETER_VALUE``...); the field at fault ends ``message``."""

    error_code: str
    message: str


class ImageInput(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``[image]`` in ``model.toml``: the model classifies images, decoded and transformed in the worker.

    The worker resizes each image to ``size`` (height, width), turns it into an RGB tensor in [0, 1],
    normalizes it with ``mean`` and ``std``, and applies a softmax to the outputs when ``logits``.
    """

    size: list[int]
    mean: list[float] = msgspec.field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = msgspec.field(default_factory=lambda: [0.5, 0.5, 0.5])
    logits: bool = True


class ModelMetadata(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The contents of ``models/NAME/VERSION/model.toml``.

    ``module_class`` (``package.module:Class``) marks a torch ``state_dict`` artifact: the class is
    imported and built with no arguments, then given the weights. Without it, a torch artifact is
    TorchScript.
    """

    name: str
    version: str
    framework: str
    artifact: str
    input_shape: list[int]
    created_at: str = ""
    accuracy: float | None = None
    class_labels: list[str] = []
    description: str = ""
    batching: dict[str, float | str] = {}
    module_class: str = ""
    image: ImageInput | None = None


COLUMN_DTYPES = {"double": "float64", "float": "float32", "long": "int64", "integer": "int32", "boolean": "bool"}
"""The MLflow signature column types a feature row can carry, and the numpy dtype of each; a model
with other types is refused at load."""
WHOLE_COLUMN_TYPES = frozenset({"long", "integer", "boolean"})
"""Those that take whole numbers only (0 or 1 for ``boolean``)."""


class Column(msgspec.Struct, frozen=True):
    """One named input of an MLflow signature: a feature's name and its type (``double``, ``long``...)."""

    name: str
    type: str


class MlflowInfo(msgspec.Struct, frozen=True):
    """Where a version served from the MLflow registry came from, as the registry described it."""

    source: str
    """The URI the operator configured (``models:/iris@champion``) or the local model directory."""
    registered_name: str
    """The model's name in the registry (the served name may differ)."""
    version: str
    flavor: str
    """``sklearn`` (loaded natively, batched as the disk path is) or ``python_function``."""
    aliases: list[str] = []
    run_id: str | None = None
    created_at: str = ""
    signature: list[Column] = []
    """The inputs its MLflow signature declares, in order; empty for a tensor signature."""
    metrics: dict[str, float] = {}
    """The metrics its run logged."""


class SourceStatus(msgspec.Struct, omit_defaults=True):
    """What a registry-sourced model's source last said: the version it resolved, or why it could not."""

    uri: str
    watched: bool
    """Whether the server follows it: an alias or a stage moves; a version number does not."""
    version: str | None = None
    """The version the URI resolved to at the last successful look."""
    checked_at: str | None = None
    error: str | None = None
    """Why the last look at the registry, or the last new version, failed (None once one succeeds)."""


class CacheInfo(msgspec.Struct):
    enabled: bool
    ttl_s: float | None


class ModelVersionInfo(msgspec.Struct):
    name: str
    version: str
    state: str
    active: bool
    framework: str
    created_at: str
    accuracy: float | None
    input_shape: list[int]
    class_labels: list[str]
    description: str
    batching: dict[str, Any]
    inputs: str
    path: str
    """The version's directory in the repository."""
    cache: CacheInfo
    error: str | None = None
    mlflow: MlflowInfo | None = None


class ModelInfo(msgspec.Struct, omit_defaults=True):
    name: str
    active_version: str | None
    versions: list[ModelVersionInfo]
    source: SourceStatus | None = None
    """For a model served from the MLflow registry: what its source last said."""


class ModelsResponse(msgspec.Struct):
    models: list[ModelInfo]


class ExperimentView(msgspec.Struct, omit_defaults=True):
    """A running experiment as the operator set it, with what this replica did with it so far."""

    model: str
    variants: dict[str, float]
    salt: str
    shadow: Shadow | None
    assigned: dict[str, int]
    """Calls this replica (all its front ends, on ``GET``) gave each variant since the experiment began
    (or last changed)."""
    shadow_results: dict[str, int] = {}
    """This replica's shadow copies of the model's calls, by result (agree, disagree, error, dropped)."""


class HealthResponse(msgspec.Struct):
    status: str
    models: dict[str, str] = {}


predict_decoder = msgspec.json.Decoder(PredictRequest)
batch_predict_decoder = msgspec.json.Decoder(BatchPredictRequest)
encoder = msgspec.json.Encoder()
