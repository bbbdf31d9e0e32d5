r"""The multi-level contrastive loss as a pure function.

For a level :math:`\ell`, anchor :math:`i` with positives :math:`P(i)`, negatives
:math:`N(i)` (in-batch and bank) and similarities :math:`s = \cos / \tau`:

.. math::

    l_i = -\frac{1}{|P(i)|} \sum_{p \in P(i)}
          \log \frac{e^{s_{ip}}}{e^{s_{ip}} + \sum_{n \in N(i)} w_{in} e^{s_{in}}}

and :math:`L = \sum_\ell \mathrm{weight}_\ell \cdot \operatorname{mean}_i l_i` over the
anchors of each level that have at least one positive and one negative (the others are
skipped and counted, never turned into NaN). With ``denominator="all"`` the
denominator also sums over all positives, :math:`\sum_{a \in P(i) \cup N(i)}`, as in
SupCon (Khosla et al., 2020, https://arxiv.org/abs/2004.11362).

Reductions (proved in the tests): one :meth:`~mlcl_losses.levels.Level.instance` level
with two views per source is NT-Xent (SimCLR, https://arxiv.org/abs/2002.05709; PML
``NTXentLoss``); :meth:`~mlcl_losses.levels.Level.supervised` with ``denominator="all"`` is
SupCon (PML ``SupConLoss``); bank negatives only is MoCo's InfoNCE
(https://arxiv.org/abs/1911.05722).

Two published negative estimators are options of the same loss (``denominator="pos_neg"``):
debiased negatives (Chuang et al., NeurIPS 2020, https://arxiv.org/abs/2007.00224,
``tau_plus``) and hardness-reweighted negatives (Robinson et al., ICLR 2021,
https://arxiv.org/abs/2010.04592, ``beta``). With :math:`|N(i)|` negatives,
:math:`\mathrm{imp}_{in} = e^{\beta s_{in}}` and :math:`\tau^+` the class prior,

.. math::

    N_g = \max\Big( \frac{-\tau^+ |N(i)| e^{s_{ip}} + |N(i)|
          \frac{\sum_n \mathrm{imp}_{in} w_{in} e^{s_{in}}}{\sum_n \mathrm{imp}_{in}}}{1 - \tau^+},
          \; |N(i)| e^{-1/\tau} \Big)

replaces :math:`\sum_n w_{in} e^{s_{in}}`. ``tau_plus=0, beta=0`` is the plain loss.

Type aliases of the signatures:

.. py:type:: Denominator
   :canonical: typing.Literal['pos_neg', 'all']

   The ``denominator`` option: ``"pos_neg"`` (InfoNCE) or ``"all"`` (SupCon).

.. py:type:: Impl
   :canonical: typing.Literal['auto', 'fused', 'reference']

   The ``impl`` option: the fused kernel, the reference implementation or ``"auto"``.

.. py:type:: FusedBackend
   :canonical: typing.Literal['auto', 'torch', 'triton']

   The ``backend`` option of the fused path: torch tiles, Triton kernels or ``"auto"``.

.. py:type:: Reduction
   :canonical: typing.Literal['mean', 'none']

   The ``reduction`` option: the mean loss or the per-anchor losses.

.. py:data:: NegativeWeightFn

   A negative weighting ``fn(hardness, mask) -> weights``, where ``hardness`` is the
   ``(N, C)`` anchor–candidate cosine similarity (detached), ``mask`` the ``(N, C)``
   bool negative mask of the level; the weights ``(N, C)`` multiply each negative's
   exponential term. :class:`~mlcl_losses.self_paced.SelfPacedWeighting` is one.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mlcl_losses._core import (
    AnchorWeightFn,
    Denominator,
    FusedBackend,
    Impl,
    LevelStats,
    NegativeWeightFn,
    NegativeWeights,
    Reduction,
    check_options,
)
from mlcl_losses._dispatch import loss_with_options
from mlcl_losses._inputs import normalize_embeddings
from mlcl_losses.levels import Level
from mlcl_losses.tags import ViewTags

__all__ = [
    "LevelStats",
    "NegativeWeightFn",
    "multilevel_info_nce",
    "normalize_embeddings",
]


def multilevel_info_nce(
    embeddings: Tensor,
    tags: ViewTags,
    levels: Sequence[Level] | Level,
    temperature: float = 0.1,
    denominator: Denominator = "pos_neg",
    bank: tuple[Tensor, ViewTags] | None = None,
    candidates: Tensor | Sequence[Tensor | None] | None = None,
    negative_weights: NegativeWeights | Sequence[NegativeWeights] = None,
    anchor_weights: Tensor | AnchorWeightFn | None = None,
    tau_plus: float = 0.0,
    beta: float = 0.0,
    pair_mask: tuple[Tensor | None, Tensor | None] | None = None,
    reduction: Reduction = "mean",
    impl: Impl = "auto",
    *,
    backend: FusedBackend = "auto",
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> tuple[Tensor, dict[str, LevelStats]]:
    r"""Multi-level InfoNCE over tagged embeddings (see the module docstring for the equation).

    Args:
        embeddings: ``(N, D)`` float; L2-normalised inside (cosine similarity).
        tags: ``(N,)`` :class:`~mlcl_losses.tags.ViewTags` of the embeddings.
        levels: the levels (:func:`~mlcl_losses.levels.comcl_levels`, ``[Level.instance()]``, ...);
            names must be unique.
        temperature: :math:`\tau > 0`.
        denominator: ``"pos_neg"`` (the positive and the negatives, NT-Xent/InfoNCE) or
            ``"all"`` (all positives and negatives, SupCon).
        bank: extra negatives ``(bank_embeddings (M, D), bank_tags (M,))``, e.g. momentum keys;
            filtered by each level's negative selector and the never-negative rules.
        candidates: per-anchor mined bank entries, ``(N, k)`` int64 indices into ``bank``
            (``-1`` = padding), for all levels or a sequence of one per level (``None`` = whole bank).
            With candidates for every level only the bank rows they name are read (memory
            ``O(N k D)``, whatever ``M``); the bank is brought to the embeddings' device.
        negative_weights: multiplies each negative's exponential term: a ``(N, N + C_b)``
            tensor (columns: batch, then bank or candidates), a callable
            :data:`NegativeWeightFn`, ``None``, or a sequence of these, one per level.
            Weights are treated as constants (no gradient flows into them).
        anchor_weights: per-anchor weights ``(N,)`` or a callable ``fn(losses (N,), valid (N,)) -> (N,)``
            applied to each level's detached per-anchor losses; the level loss becomes
            :math:`\sum_i v_i l_i / |\text{valid}|`.
        tau_plus: class prior of the debiased estimator, in ``[0, 1)``; 0 disables it.
        beta: concentration of hardness reweighting (HCL), >= 0; 0 disables it.
        pair_mask: optional ``(positives (N, N) or (N, N + M) bool | None, negatives (N, N + C_b)
            bool | None)`` further restricting the pairs of every level (used by the PML adapter).
            Positives of width ``N + M`` (whole bank, no ``candidates``) also admit bank entries
            as positives where the mask is True and the level relates them to the anchor
            (:func:`~mlcl_losses.levels.bank_positive_mask`): the bank is then a reference set.
        reduction: ``"mean"`` (the loss above) or ``"none"``: a ``(L, N)`` tensor of per-anchor
            losses times the level weight (``anchor_weights`` applied, 0 where an anchor did not
            contribute; ``stats[name].valid`` says which did).
        impl: ``"reference"`` (dense, for tests), ``"fused"`` (tiled, memory-lean; an error
            where it cannot compute the options) or ``"auto"`` (fused where available). Every
            option is fused but a negative-weight callable that is neither elementwise nor a
            streaming pace (see :doc:`/fused_loss`); ``stats[name].path`` says which ran.
        backend: the fused backend: ``"torch"`` (tiles), ``"triton"`` (CUDA kernels, or Triton's
            CPU interpreter under ``TRITON_INTERPRET=1``; an error where they do not apply) or
            ``"auto"`` (Triton on CUDA where it applies, else the torch tiles).
        block_rows: anchors per row tile of the torch tiles (default 256).
        block_cols: candidates per column tile of the torch tiles (default 4096).

    Returns:
        ``(loss, stats)``: the 0-dim total loss (float32, or float64 for float64 input) and
        a dict level name -> :class:`LevelStats`.

    Raises:
        ValueError, TypeError: on invalid input, naming the argument and the value.

    Examples:
        >>> import torch
        >>> from mlcl_losses import ViewTags, Level
        >>> z = torch.randn(4, 8)
        >>> tags = ViewTags(kind=[1, 1, 1, 1], quality=[0, 0, 0, 0], source=[0, 0, 1, 1])
        >>> loss, stats = multilevel_info_nce(z, tags, [Level.instance()], temperature=0.5)
        >>> int(stats["instance"].anchors)
        4
    """
    options = check_options(temperature, denominator, tau_plus, beta, reduction, impl, backend, block_rows, block_cols)
    return loss_with_options(
        embeddings,
        tags,
        levels,
        options,
        bank=bank,
        candidates=candidates,
        negative_weights=negative_weights,
        anchor_weights=anchor_weights,
        pair_mask=pair_mask,
    )
