"""Settings: what the features are (:class:`FeatureSettings`) and how they are scored
(:class:`ScoreSettings`).

Two frozen dataclasses, validated once (in ``__post_init__``), with a default and a line of
documentation per field. :func:`~trak_fast.attribute`, :class:`~trak_fast.TRAK`,
:func:`~trak_fast.featurize` and :class:`~trak_fast.Featurizer` take them; their keyword
arguments (``proj_dim=512``, ``kernel="per_layer"``, ...) build them, so both spellings work::

    trak_fast.attribute(model, ckpts, train, targets, proj_dim=512, lambda_reg=1.0)
    trak_fast.attribute(model, ckpts, train, targets,
                        features=FeatureSettings(proj_dim=512), scoring=ScoreSettings(lambda_reg=1.0))

A store records the feature settings (``dataclasses.asdict``) and refuses other ones.
Run-time choices that do not change a result (``device``, ``progress``) are plain arguments.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from .ops.projection import MAX_SEED, check_int, check_kind, check_nnz

GRADIENTS = ("auto", "hooks", "vmap")
PROJECTIONS = ("dense", "per_layer", "factored")
FEATURE_DTYPES = ("float32", "float16")
KERNELS = ("full", "per_layer")
KERNEL_WEIGHTS = ("none", "out_to_loss", "fisher")
ENSEMBLES = ("mean", "trak")
CURVATURES = ("kernel", "fisher")
NORMALIZE = ("none", "train", "targets", "both")

#: Bytes one group of per-example gradients (``B x p_group`` elements) may take.
DEFAULT_GRAD_MEMORY = 1 << 30
#: ``(k_out, k_in)`` per layer of ``projection="factored"`` (bergson's and LoGra's 16 x 16).
DEFAULT_FACTORED_DIMS = (16, 16)
#: ``factored_dims="auto"``'s bounds on ``k`` per side (:func:`auto_factored_dims`).
AUTO_FACTORED_MIN, AUTO_FACTORED_MAX = 32, 48
#: Relative damping: ``lambda = DEFAULT_LAMBDA_REL * tr(K) / n``, chosen with the LDS sweep.
DEFAULT_LAMBDA_REL = 3.0
#: The kernel's row weights for ``ensemble="mean"`` (``"trak"`` always uses ``"none"``), chosen
#: with the LDS harness: at lambda_rel = 3 it beat the unweighted kernel on all five problems
#: (digits M = 1 and 5, breast_cancer, the deeper digits MLP, and wine, not used for tuning),
#: and unlike ``"fisher"`` it never fell below the gradient dot product.
DEFAULT_KERNEL_WEIGHTS = "out_to_loss"
#: ``curvature="fisher"``'s damping, relative to each layer's mean nonzero Fisher eigenvalue:
#: on the language-model LDS benchmark (``benchmarks/bench_lm_lds.py --library``) with the
#: language-modeling defaults (factored 32 x 32, 4 Fisher rows per sequence), c = 0.01 / 0.05 /
#: 0.1 gave 0.157 / 0.155 / 0.153 (small model), 0.081 / 0.079 / 0.076 (medium) and 0.146 /
#: 0.145 / 0.147 (completions); c = 1 was well below (0.134 small, one row per sequence).
DEFAULT_FISHER_DAMPING = 0.01


def check_choice(name: str, value: Any, choices: Tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_factored_dims(dims: Any) -> Union[str, Tuple[int, int]]:
    if isinstance(dims, str) and dims == "auto":
        return dims
    if (not isinstance(dims, (tuple, list)) or len(dims) != 2
            or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 4096 for k in dims)):
        raise ValueError("factored_dims must be a pair of ints (k_out, k_in), each in [1, 4096], "
                         f"or 'auto', got {dims!r}")
    return int(dims[0]), int(dims[1])


def auto_factored_dims(width: int) -> Tuple[int, int]:
    """``factored_dims="auto"``: ``k`` per side, ``(k, k)``, from the model's ``width`` (the
    median over its factored matrix layers of ``min(d_out, d_in)``: a transformer's hidden
    size)::

        k = min(AUTO_FACTORED_MAX, max(AUTO_FACTORED_MIN, width // 2))

    Half the width, between 32 and 48. Chosen on the language-model LDS benchmark
    (``benchmarks/bench_lm_lds.py``, several draws of the projections and labels): on the
    width-64 model 32 x 32 (the width rule's value; a larger ``k`` costs it more than the
    raw gradients), on the width-96 model 48 x 48 beat 32 x 32 in each of four draws (+0.005,
    +0.006, +0.003, +0.002 LDS) while 64 x 64 added 0.001 more (three draws) at 1.4x the time. The cap keeps a wide
    model's features (``k^2`` per matrix) and per-layer Fisher (``k^4`` per layer) bounded."""
    return (min(AUTO_FACTORED_MAX, max(AUTO_FACTORED_MIN, int(width) // 2)),) * 2


@dataclass(frozen=True)
class FeatureSettings:
    """What a checkpoint's features are: ``phi(z) = P^T grad f(z)`` and how it is computed."""

    #: ``k``, columns of the dense projection; ``None`` keeps the raw gradients (``k = p``).
    proj_dim: Optional[int] = 2048
    #: Entries of P: ``"rademacher"`` (+-1), ``"gaussian"`` or ``"sparse"`` (``nnz`` per row).
    kind: str = "rademacher"
    #: Seed of P; checkpoint ``m`` uses ``model_seed(seed, m)``.
    seed: int = 0
    #: Nonzeros per row of P for ``kind="sparse"``.
    nnz: int = 4
    #: ``"dense"`` (one P), ``"per_layer"`` (``proj_dim`` split over the layers, one P each) or
    #: ``"factored"`` (per layer ``vec(P_out^T G P_in)``; ``proj_dim`` unused).
    projection: str = "dense"
    #: ``(k_out, k_in)`` per layer for ``projection="factored"`` (default ``(16, 16)``), or
    #: ``"auto"``: ``(k, k)`` from the model's width (:func:`auto_factored_dims`; the
    #: language-modeling task's choice).
    factored_dims: Optional[Union[str, Tuple[int, int]]] = None
    #: Per-example gradients by ``"auto"`` (hooks where a layer adapter exists), ``"hooks"``
    #: or ``"vmap"``; they agree up to float32 rounding.
    gradients: str = "auto"
    #: Names of the parameters to differentiate (``None``: all); the others are constants.
    grad_wrt: Optional[Tuple[str, ...]] = None
    #: Bytes one group of per-example gradients may take.
    grad_memory: int = DEFAULT_GRAD_MEMORY
    #: How :class:`~trak_fast.TRAK` stores features: ``"float32"`` or ``"float16"``.
    feature_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.proj_dim is not None and (isinstance(self.proj_dim, bool) or not isinstance(
                self.proj_dim, int) or not 1 <= self.proj_dim < 2**31):
            raise ValueError("proj_dim must be an int in [1, 2**31) or None (raw gradients), "
                             f"got {self.proj_dim!r}")
        kind_id = check_kind(self.kind)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_choice("projection", self.projection, PROJECTIONS)
        check_choice("gradients", self.gradients, GRADIENTS)
        if self.proj_dim is not None and self.projection != "factored":
            check_nnz(self.nnz, kind_id, self.proj_dim)
        if self.projection == "factored":
            dims = DEFAULT_FACTORED_DIMS if self.factored_dims is None else self.factored_dims
            object.__setattr__(self, "factored_dims", check_factored_dims(dims))
            if self.kind == "sparse":
                raise ValueError("kind='sparse' is a dense projection kind; projection='factored' "
                                 "takes kind='rademacher' or 'gaussian'")
            if self.gradients == "vmap":
                raise ValueError("projection='factored' needs the hook path; use gradients='auto' "
                                 "or 'hooks', not 'vmap'")
        elif self.factored_dims is not None:
            raise ValueError("factored_dims is only used with projection='factored', got "
                             f"factored_dims={self.factored_dims!r} with projection={self.projection!r}")
        if self.projection == "per_layer" and self.proj_dim is None:
            raise ValueError("projection='per_layer' splits proj_dim over the layers; "
                             "got proj_dim=None (raw gradients are already per layer)")
        if self.grad_wrt is not None:
            if isinstance(self.grad_wrt, str):
                raise TypeError("grad_wrt must be a list of parameter names, got the string "
                                f"{self.grad_wrt!r}")
            names = tuple(self.grad_wrt)
            if not names:
                raise ValueError("grad_wrt must name at least one parameter, got an empty list")
            if not all(isinstance(n, str) for n in names):
                raise TypeError(f"grad_wrt must hold parameter names (str), got {list(names)!r}")
            object.__setattr__(self, "grad_wrt", names)
        if isinstance(self.grad_memory, bool) or not isinstance(self.grad_memory, int) \
                or self.grad_memory < 1:
            raise ValueError(f"grad_memory must be a positive number of bytes, got {self.grad_memory!r}")
        check_choice("feature_dtype", self.feature_dtype, FEATURE_DTYPES)


@dataclass(frozen=True)
class ScoreSettings:
    """How features become scores: the kernel, its damping and the ensemble over checkpoints.

    ``ensemble="mean"`` (the paper's estimator): ``lambda = lambda_reg * tr(K) / n`` (relative)
    with ``lambda_reg = DEFAULT_LAMBDA_REL``. ``ensemble="trak"``: MadryLab trak 0.3.2's scaling
    and normalization, ``lambda_reg = 0`` absolute, unweighted kernel. ``None`` fields are
    filled in with these defaults.
    """

    #: ``"mean"`` or ``"trak"`` (see :mod:`trak_fast.scoring.scores`).
    ensemble: str = "mean"
    #: Damping ``lambda``; relative to ``tr(K) / n`` when ``relative_lambda``.
    lambda_reg: Optional[float] = None
    #: Whether ``lambda_reg`` is relative (default: ``True`` for ``"mean"``).
    relative_lambda: Optional[bool] = None
    #: ``"full"`` (one kernel over all features) or ``"per_layer"`` (its block diagonal).
    kernel: str = "full"
    #: Row weights of ``Phi^T W Phi``: ``"none"``, ``"out_to_loss"`` (``W = Q``) or ``"fisher"``
    #: (``W = Q^2``); default by ensemble.
    kernel_weights: Optional[str] = None
    #: ``"kernel"`` (TRAK's ``Phi^T W Phi`` of the train features) or ``"fisher"`` (the true
    #: Fisher from labels sampled from the model, per block of ``kernel``, train rows the
    #: log-likelihood gradients; ``lambda_reg`` relative to each block's mean eigenvalue,
    #: default ``DEFAULT_FISHER_DAMPING``; see :mod:`trak_fast.scoring.fisher`). Stores keep
    #: the rows of the one they were created with (``TRAK(curvature=...)``).
    curvature: str = "kernel"
    #: Unit normalization, per checkpoint: ``"train"`` divides score ``(i, j)`` by the norm of
    #: train row ``i`` in the scoring space (``phi_i``; ``G_i`` for the Fisher), ``"targets"`` by
    #: that of target ``j``'s feature, ``"both"`` by both (cosine-like, as TrackStar and
    #: retrieval-style uses prefer), ``"none"`` (default) by neither. See
    #: :func:`trak_fast.scoring.scores.normalize_scores`.
    normalize: str = "none"

    def __post_init__(self) -> None:
        check_choice("ensemble", self.ensemble, ENSEMBLES)
        check_choice("kernel", self.kernel, KERNELS)
        check_choice("curvature", self.curvature, CURVATURES)
        check_choice("normalize", self.normalize, NORMALIZE)
        relative = self.ensemble == "mean" if self.relative_lambda is None else self.relative_lambda
        if not isinstance(relative, (bool, np.bool_)):
            raise ValueError(f"relative_lambda must be True, False or None, got {relative!r}")
        if self.curvature == "fisher" and (self.ensemble != "mean" or not relative):
            raise ValueError("curvature='fisher' takes ensemble='mean' and a relative lambda_reg "
                             f"(a fraction of the mean eigenvalue), got ensemble={self.ensemble!r}, "
                             f"relative_lambda={self.relative_lambda!r}")
        lam = self.lambda_reg
        if lam is None:
            lam = (DEFAULT_FISHER_DAMPING if self.curvature == "fisher" else
                   DEFAULT_LAMBDA_REL if relative else 0.0)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not np.isfinite(lam) \
                or lam < 0:
            raise ValueError(f"lambda_reg must be a finite number >= 0, got {lam!r}")
        weights = self.kernel_weights
        if weights is None:
            weights = "none" if self.ensemble == "trak" else DEFAULT_KERNEL_WEIGHTS
        check_choice("kernel_weights", weights, KERNEL_WEIGHTS)
        if self.ensemble == "trak" and (self.kernel != "full" or weights != "none"):
            raise ValueError("ensemble='trak' reproduces MadryLab trak's dense projection and full "
                             f"kernel; it cannot be combined with kernel={self.kernel!r}, "
                             f"kernel_weights={weights!r}")
        object.__setattr__(self, "lambda_reg", float(lam))
        object.__setattr__(self, "relative_lambda", bool(relative))
        object.__setattr__(self, "kernel_weights", weights)

    def check_features(self, features: FeatureSettings) -> None:
        """Refuses combinations that the ensemble cannot score."""
        if self.ensemble == "trak" and features.projection != "dense":
            raise ValueError("ensemble='trak' reproduces MadryLab trak's dense projection; it "
                             f"cannot be combined with projection={features.projection!r}")


FEATURE_FIELDS = tuple(f.name for f in dataclasses.fields(FeatureSettings))
SCORE_FIELDS = tuple(f.name for f in dataclasses.fields(ScoreSettings))


def _build(cls: type, given: Optional[Any], options: Dict[str, Any], argument: str) -> Any:
    if given is not None and not isinstance(given, cls):
        raise TypeError(f"{argument} must be a {cls.__name__}, got {type(given).__name__}")
    if given is None:
        return cls(**options)
    return dataclasses.replace(given, **options) if options else given


#: Feature fields that choose the projection: a caller who sets any of them by keyword has
#: chosen it, and a task's preferred projection does not apply.
PROJECTION_FIELDS = ("proj_dim", "projection", "factored_dims", "kind", "nnz", "gradients")
#: Score fields that choose the estimator: a caller who sets any of them by keyword has chosen
#: it, and a task's preferred scoring does not apply (``lambda_reg`` alone keeps it: the
#: damping is relative either way).
ESTIMATOR_FIELDS = ("ensemble", "curvature", "kernel", "kernel_weights", "relative_lambda")


def preferred(task: Any, options: Mapping[str, Any], features: Optional[FeatureSettings],
              scoring: Optional[ScoreSettings]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The keyword options with ``task``'s preferred settings filled in where the caller left
    them unset: ``(feature options, score options)``.

    A task states its preferences in ``preferred_features()`` and
    ``preferred_scoring(features)`` (:class:`~trak_fast.Task`; the built-in language-modeling
    task prefers the Fisher curvature on factored features, chosen on the language-model LDS
    benchmark). They fill only what the caller did not choose: none where a settings object
    is passed whole, no projection where any of :data:`PROJECTION_FIELDS` is a keyword, no
    estimator where any of :data:`ESTIMATOR_FIELDS` is.
    """
    feature_options = {k: v for k, v in options.items() if k in FEATURE_FIELDS}
    score_options = {k: v for k, v in options.items() if k in SCORE_FIELDS}
    if task is None:
        return feature_options, score_options
    if features is None and not any(k in options for k in PROJECTION_FIELDS):
        feature_options = {**task.preferred_features(), **feature_options}
    if scoring is None and not any(k in options for k in ESTIMATOR_FIELDS):
        chosen = features if features is not None else FeatureSettings(**feature_options)
        score_options = {**task.preferred_scoring(chosen), **score_options}
    return feature_options, score_options


def split_options(options: Mapping[str, Any], *, features: Optional[FeatureSettings] = None,
                  scoring: Optional[ScoreSettings] = None, accepts: str = "features and scoring",
                  where: str = "this call", task: Any = None
                  ) -> Tuple[FeatureSettings, ScoreSettings]:
    """``(FeatureSettings, ScoreSettings)`` from the settings objects given and keyword options.

    A keyword overrides the field of the object passed with it; an unknown keyword raises
    ``TypeError`` naming it. ``accepts`` says which of the two groups the call takes keywords
    of. With a ``task``, its preferred settings fill what the caller left unset
    (:func:`preferred`).
    """
    allowed = (FEATURE_FIELDS if "features" in accepts else ()) + \
        (SCORE_FIELDS if "scoring" in accepts else ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{where} got unexpected keyword argument(s) {unknown}; its settings are "
                        f"{list(allowed)}")
    feature_options, score_options = preferred(task, options, features, scoring)
    if "scoring" not in accepts:
        score_options = {}
    return (_build(FeatureSettings, features, feature_options, "features"),
            _build(ScoreSettings, scoring, score_options, "scoring"))


def feature_settings(options: Mapping[str, Any], features: Optional[FeatureSettings] = None,
                     where: str = "this call", task: Any = None) -> FeatureSettings:
    """:func:`split_options` for calls that take only feature settings."""
    return split_options(options, features=features, accepts="features", where=where,
                         task=task)[0]


def score_settings(options: Mapping[str, Any], scoring: Optional[ScoreSettings] = None,
                   where: str = "this call") -> ScoreSettings:
    """:func:`split_options` for calls that take only score settings."""
    return split_options(options, scoring=scoring, accepts="scoring", where=where)[1]
