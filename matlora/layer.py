"""Hierarchical (Matryoshka) LoRA maths, shared by the trainer and the server.

An adapter on a linear layer holds ``lora_A`` (max_rank x in) and ``lora_B``
(out x max_rank), PEFT's layouts, and a fixed diagonal ``p`` set by the training
method. Every prefix ``lora_A[:k]``, ``lora_B[:, :k]`` is a rank-k adapter.

Training forward (full rank)::

    y = base(x) + ((x @ A.T) * p) @ B.T

Inference at rank k computes only the prefix slice::

    y = base(x) + ((x @ A[:k].T) * c_k) @ B[:, :k].T

where ``c_k`` is ``s(k)`` when P is dropped (the MatryoshkaLoRA paper's inference)
and ``p[:k]`` when P is kept (the function the matryoshka objective trained).
Rank 0 is the base layer alone. ``s(r) = alpha * {1, 1/r, 1/sqrt(r)}`` for the
scalings none, rank and sqrt.

The rank of each batch row travels with the call in a :class:`RankPlan`, set for the
duration of a forward pass with :func:`at_rank`. Nothing about a request is stored
on the shared modules, so concurrent forward passes in other threads or asyncio tasks
cannot race on it.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("matryoshka", "dylora", "lora", "nested")
SCALINGS = ("none", "rank", "sqrt")
INFERENCE_SCALINGS = ("drop_p", "keep_p")
DEFAULT_ADAPTER = "default"


def trained_inference_scaling(method: str) -> str:
    """Return the inference scaling under which rank k serves the function ``method`` trained at rank k.

    Nested trains each prefix at s(k), which ``drop_p`` serves. Matryoshka trains the
    prefixes through p, which ``keep_p`` keeps. For dylora both coincide, and ``keep_p``
    keeps lora's s(R).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return "drop_p" if method == "nested" else "keep_p"


def rank_scale(rank: int, alpha: float, scaling: str) -> float:
    """Return s(rank): the scale of a rank-``rank`` adapter.

    Args:
        rank: a rank >= 1.
        alpha: LoRA's ``lora_alpha``.
        scaling: ``"none"`` (alpha), ``"rank"`` (alpha / rank) or ``"sqrt"`` (alpha / sqrt(rank)).

    Example:
        >>> rank_scale(4, alpha=8.0, scaling="sqrt")
        4.0
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1 to have a scale, got {rank}")
    if scaling == "none":
        return float(alpha)
    if scaling == "rank":
        return alpha / rank
    if scaling == "sqrt":
        return alpha / math.sqrt(rank)
    raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")


def training_p(
    method: str,
    max_rank: int,
    train_ranks: Sequence[int],
    scaling: str,
    alpha: float,
    dylora_rank: int | None = None,
) -> torch.Tensor:
    """Return the diagonal p (length max_rank, float32) that a method trains with.

    - ``lora``: ``p = s(max_rank)`` everywhere.
    - ``dylora``: ``p = s(b)`` on the first ``b = dylora_rank`` entries and 0 after.
      Without ``dylora_rank``, b is max_rank.
    - ``matryoshka`` and ``nested``: ``p[i] = sum of s(r) over train_ranks r >= i + 1``.
      Nested training never uses p itself; it is the vector that matryoshka
      approximates nested with, and what "P kept" inference uses for both.

    Example:
        >>> training_p("matryoshka", 8, [1, 2, 4, 8], "none", 1.0).tolist()
        [4.0, 3.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    """
    if method == "lora":
        return torch.full((max_rank,), rank_scale(max_rank, alpha, scaling))
    if method == "dylora":
        b = max_rank if dylora_rank is None else dylora_rank
        p = torch.zeros(max_rank)
        p[:b] = rank_scale(b, alpha, scaling)
        return p
    if method in ("matryoshka", "nested"):
        p = torch.zeros(max_rank)
        for r in train_ranks:
            p[:r] += rank_scale(r, alpha, scaling)
        return p
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


@dataclass(frozen=True)
class AdapterSpec:
    """How one adapter was trained and how it scales a rank-k prefix at inference."""

    method: str
    max_rank: int
    train_ranks: tuple[int, ...]
    scaling: str
    alpha: float
    inference_scaling: str

    def p(self) -> torch.Tensor:
        return training_p(self.method, self.max_rank, self.train_ranks, self.scaling, self.alpha)

    def prefix_scale(self, rank: int, inference_scaling: str | None = None) -> float | torch.Tensor:
        """Return c_k, the scale of the rank-k prefix: a float, or a length-k tensor.

        ``drop_p`` gives s(k). ``keep_p`` gives the p the method trained the prefix
        with: p[:k] for matryoshka and nested, s(max_rank) for lora, and s(k) for
        dylora, whose p at b = k is s(k), so both scalings coincide for it.
        """
        mode = inference_scaling or self.inference_scaling
        if mode not in INFERENCE_SCALINGS:
            raise ValueError(f"inference_scaling must be one of {', '.join(INFERENCE_SCALINGS)}, got {mode!r}")
        if mode == "drop_p" or self.method == "dylora":
            return rank_scale(rank, self.alpha, self.scaling)
        if self.method == "lora":
            return rank_scale(self.max_rank, self.alpha, self.scaling)
        return self.p()[:rank].clone()


@dataclass(frozen=True)
class RowGroup:
    """Batch rows that share one adapter and one rank. ``rows`` is None for every row."""

    adapter: str
    rank: int
    rows: torch.Tensor | None


@dataclass(frozen=True)
class RankPlan:
    """The adapter and rank of every row of one forward pass, grouped once per call.

    ``inference_scaling``, when set, overrides each adapter's own (the trainer sets
    ``drop_p`` for DyLoRA and nested steps, ``matlora eval`` sets what it measures).
    """

    groups: tuple[RowGroup, ...]
    inference_scaling: str | None = None
    # Rows the plan was built for when ranks or adapters were given per row; None for one rank for all.
    batch_size: int | None = None

    @classmethod
    def build(
        cls,
        ranks: int | Sequence[int] | torch.Tensor,
        adapters: str | Sequence[str] = DEFAULT_ADAPTER,
        inference_scaling: str | None = None,
    ) -> RankPlan:
        """Group rows by (adapter, rank). An int rank and a str adapter apply to every row."""
        if inference_scaling is not None and inference_scaling not in INFERENCE_SCALINGS:
            raise ValueError(
                f"inference_scaling must be one of {', '.join(INFERENCE_SCALINGS)}, got {inference_scaling!r}"
            )
        rank_list = ranks.tolist() if isinstance(ranks, torch.Tensor) else ranks
        if not isinstance(rank_list, (list, tuple)):
            _check_rank(rank_list)
            if isinstance(adapters, str):
                return cls((RowGroup(adapters, rank_list, None),), inference_scaling)
            rank_list = [rank_list] * len(adapters)
        adapter_list = [adapters] * len(rank_list) if isinstance(adapters, str) else list(adapters)
        if len(adapter_list) != len(rank_list):
            raise ValueError(f"got {len(rank_list)} ranks but {len(adapter_list)} adapters; give one per batch row")

        rows_by_key: dict[tuple[str, int], list[int]] = {}
        for row, (adapter, rank) in enumerate(zip(adapter_list, rank_list)):
            _check_rank(rank)
            rows_by_key.setdefault((adapter, int(rank)), []).append(row)
        if len(rows_by_key) == 1:
            (adapter, rank), _ = rows_by_key.popitem()
            return cls((RowGroup(adapter, rank, None),), inference_scaling, len(rank_list))
        groups = tuple(
            RowGroup(adapter, rank, torch.tensor(rows, dtype=torch.long))
            for (adapter, rank), rows in rows_by_key.items()
        )
        return cls(groups, inference_scaling, len(rank_list))


def _check_rank(rank: object) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be an integer >= 0, got {rank!r}")


_ACTIVE_PLAN: contextvars.ContextVar[RankPlan | None] = contextvars.ContextVar("matlora_rank_plan", default=None)


@contextlib.contextmanager
def at_rank(
    ranks: int | Sequence[int] | torch.Tensor,
    adapter: str | Sequence[str] = DEFAULT_ADAPTER,
    inference_scaling: str | None = None,
) -> Iterator[RankPlan]:
    """Run the forward passes inside the block at the given rank(s).

    ``ranks`` is one int for the whole batch or one per batch row; ``adapter`` likewise.
    The plan lives in a context variable, so it is private to the calling thread or
    asyncio task. Batch rows are dim 0 of every adapted layer's input, as in transformers'
    decoder models. NOTE: a model that flattens batch and sequence into one dim before its
    linear layers supports one rank for the whole batch only.

    Example:
        >>> with at_rank([1, 8, 0]):  # row 0 at rank 1, row 1 at rank 8, row 2 the base model
        ...     logits = model(input_ids).logits  # doctest: +SKIP
    """
    token = _ACTIVE_PLAN.set(RankPlan.build(ranks, adapter, inference_scaling))
    try:
        yield _ACTIVE_PLAN.get()
    finally:
        _ACTIVE_PLAN.reset(token)


def active_plan() -> RankPlan | None:
    """Return the plan set by the innermost :func:`at_rank`, or None outside one."""
    return _ACTIVE_PLAN.get()


class AdapterWeights(nn.Module):
    """One adapter's weights on one linear layer, allocated once at max_rank."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: AdapterSpec,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.lora_A = nn.Parameter(torch.empty(spec.max_rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, spec.max_rank, dtype=dtype, device=device))
        # Same initialisation as PEFT's default: Kaiming-uniform A, zero B, so training starts at the base model.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.register_buffer("p", spec.p().to(device=device), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Inference weights by (inference scaling, dtype, rank): the rank-k views of lora_A and of
        # lora_B with the keep_p diagonal folded in, and the scalar part of c_k. Each entry is
        # tagged with the weights' version counters and device, so an optimizer step, a load or
        # a move rebuilds it on next use.
        self._inference_weights: dict[tuple, tuple[tuple, tuple[torch.Tensor, torch.Tensor, float]]] = {}

    def training_delta(self, x: torch.Tensor) -> torch.Tensor:
        """((x A^T) * p) B^T at full rank, the function the method trains."""
        hidden = F.linear(self.dropout(x), self.lora_A)  # (..., max_rank)
        return F.linear(hidden * self.p.to(hidden.dtype), self.lora_B)

    def prefix_delta(self, x: torch.Tensor, rank: int, inference_scaling: str | None) -> torch.Tensor:
        """((x A[:k]^T) * c_k) B[:, :k]^T, computed on the rank-k slices only.

        Returns the delta in the adapter's dtype, or in float64 for single-token rows.
        """
        if rank > self.spec.max_rank:
            raise ValueError(f"rank must be in 0..{self.spec.max_rank} for this adapter, got {rank}")
        mode = inference_scaling or self.spec.inference_scaling
        if torch.is_grad_enabled() and self.lora_A.requires_grad:
            # Training a prefix (DyLoRA, nested): autograd needs the parameters themselves.
            hidden = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A[:rank])  # (..., rank)
            scale = self.spec.prefix_scale(rank, mode)
            scale = scale.to(hidden.device, hidden.dtype) if isinstance(scale, torch.Tensor) else scale
            return F.linear(hidden * scale, self.lora_B[:, :rank])

        # One token per row is a decode step. GEMM libraries pick their summation order by
        # the number of rows, so in bfloat16 or float32 a row's delta would change with the
        # batch around it. In float64 the orders differ by about 1e-16 (relative), far below
        # one step of the model's dtype, so the rounded delta does not depend on the batch,
        # and the few rows of a decode step keep float64 cheap.
        dtype = torch.float64 if x.dim() == 3 and x.shape[1] == 1 else self.lora_A.dtype
        lora_a, folded_b, scale = self._prefix_weights(rank, mode, dtype)
        hidden = F.linear(x.to(dtype), lora_a)  # (..., rank)
        if scale != 1.0:
            hidden = hidden * scale
        return F.linear(hidden, folded_b)

    def _scalar_scale(self, rank: int, mode: str) -> float:
        """The part of c_k not folded into lora_B: s(k) or s(max_rank), or 1 when c_k = p[:k]."""
        if self._folds_p(mode):
            return 1.0
        return self.spec.prefix_scale(rank, mode)

    def _folds_p(self, mode: str) -> bool:
        # keep_p for matryoshka and nested scales rank k by p[:k], a prefix of one vector p,
        # so B * p serves every rank. The other cases scale by one number per rank.
        return mode == "keep_p" and self.spec.method in ("matryoshka", "nested")

    def _prefix_weights(self, rank: int, mode: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Return lora_A[:k], lora_B[:, :k] (keep_p folded in) in ``dtype``, and the scalar scale."""
        version = (self.lora_A._version, self.lora_B._version, self.lora_A.device)
        cached = self._inference_weights.get((mode, dtype, rank))
        if cached is not None and cached[0] == version:
            return cached[1]
        full = self._inference_weights.get((mode, dtype, None))
        if full is None or full[0] != version:
            with torch.no_grad():
                lora_a = self.lora_A.detach().to(dtype)
                lora_b = self.lora_B.detach().to(dtype)
                if self._folds_p(mode):
                    lora_b = lora_b * self.p.to(device=lora_b.device, dtype=dtype)
            full = (version, (lora_a, lora_b.contiguous(), 1.0))
            self._inference_weights[(mode, dtype, None)] = full
        lora_a, lora_b, _ = full[1]
        prepared = (lora_a[:rank], lora_b[:, :rank], self._scalar_scale(rank, mode))
        self._inference_weights[(mode, dtype, rank)] = (version, prepared)
        return prepared


class MatryoshkaLinear(nn.Module):
    """An ``nn.Linear`` with hierarchical LoRA adapters that serve any rank prefix.

    ``adapters`` maps an adapter name to its :class:`AdapterWeights`, so one base model
    can carry several adapters and a batch can mix them row by row.

    Outside :func:`at_rank`, the layer runs the training forward of its only adapter,
    ``base(x) + ((x A^T) * p) B^T``. Inside it, each row group runs at its own rank
    on the prefix slices, and rows at rank 0 or with no adapter get ``base(x)``.
    """

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        # Code that reads `layer.weight.dtype` or `.device` (transformers does) sees the base weight.
        return self.base_layer.weight

    def add_adapter(self, name: str, spec: AdapterSpec, dropout: float = 0.0, dtype: torch.dtype | None = None) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already on this layer")
        weight = self.base_layer.weight
        self.adapters[name] = AdapterWeights(
            self.in_features, self.out_features, spec, dropout, dtype=dtype or weight.dtype, device=weight.device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        plan = _ACTIVE_PLAN.get()
        if plan is None:
            return result + self._training_delta(x).to(result.dtype)

        if plan.batch_size is not None and plan.batch_size != x.shape[0]:
            raise ValueError(
                f"at_rank was given {plan.batch_size} per-row ranks or adapters, but the batch has "
                f"{x.shape[0]} rows; give one per row, or a single int rank for the whole batch"
            )
        for group in plan.groups:
            # An adapter that targets other layers leaves this one as the base layer.
            if group.rank == 0 or group.adapter not in self.adapters:
                continue
            adapter = self.adapters[group.adapter]
            if group.rows is None:
                # Rounded to the output dtype before the sum, as in the row-group branch below,
                # so a row gets the same bits alone and in a mixed batch.
                delta = adapter.prefix_delta(x, group.rank, plan.inference_scaling).to(result.dtype)
                # The base output is a fresh tensor, so adding in place is safe unless autograd records it.
                result = result + delta if result.requires_grad else result.add_(delta)
            else:
                rows = group.rows.to(x.device)
                delta = adapter.prefix_delta(x.index_select(0, rows), group.rank, plan.inference_scaling)
                result = result.index_add(0, rows, delta.to(result.dtype))
        return result

    def _training_delta(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.adapters) != 1:
            raise RuntimeError(
                f"this layer has {len(self.adapters)} adapters; choose one with matlora.at_rank(rank, adapter=...)"
            )
        (adapter,) = self.adapters.values()
        return adapter.training_delta(x.to(adapter.lora_A.dtype))
