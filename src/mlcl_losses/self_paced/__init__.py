r"""Self-paced weighting: admit hard samples gradually, as the pace :math:`\lambda` grows.

Self-paced learning (Kumar et al., NeurIPS 2010) weights each sample by the minimiser

.. math::

    v^*(h, \lambda) = \operatorname*{arg\,min}_{v \in [0, 1]} \; v h + f(v; \lambda)

of a self-paced regulariser :math:`f`, where :math:`h` is the sample's hardness. CoMCL
uses it for "dynamic hard sample mining": early in training the hardest negatives (often
unlabelled lesions or strong artefacts) are down-weighted; as :math:`\lambda` rises they
are admitted. Hardness is used as given (for negatives, the anchor–negative cosine
similarity; for anchors, the anchor's loss), clamped to ``[0, 1]`` for similarities and
to ``[0, inf)`` for losses. Higher is harder.

Regularisers and their closed-form weights, all in ``[0, 1]``, non-increasing in
:math:`h`, non-decreasing in :math:`\lambda`, and all 1 as :math:`\lambda \to \infty`:

=============  ================================================================================  ===============
regulariser    :math:`f(v; \lambda)`                                                             reference
=============  ================================================================================  ===============
``hard``       :math:`-\lambda v`                                                                Kumar 2010
``linear``     :math:`\lambda (v^2/2 - v)`                                                       Jiang 2014
``log``        :math:`\frac{\lambda}{1-\zeta}(\zeta v - \zeta^v / \log \zeta)`                   Jiang 2014
``mixture``    :math:`\gamma^2 / (v + \gamma/\sqrt\lambda)` with :math:`\gamma = c\sqrt\lambda`  Zhao 2015
=============  ================================================================================  ===============

=============  ===========================================================================================
regulariser    :math:`v^*(h, \lambda)`
=============  ===========================================================================================
``hard``       :math:`\mathbb{1}[h < \lambda]`
``linear``     :math:`\max(0, 1 - h / \lambda)`
``log``        :math:`\log(\zeta + (1-\zeta) h/\lambda) / \log \zeta` if :math:`h < \lambda`, else 0
``mixture``    :math:`\mathrm{clip}(c(\sqrt{\lambda / h} - 1), 0, 1)` (1 at :math:`h = 0`)
=============  ===========================================================================================

Reconstruction notes. Jiang et al.'s logarithmic regulariser is
:math:`f(v) = \zeta v - \zeta^v / \log \zeta` with :math:`\zeta = 1 - \lambda` (so
:math:`0 < \lambda < 1`) and minimiser :math:`v^* = \log(h + \zeta) / \log \zeta` for
:math:`h < \lambda`, else 0. With that tie the weights are not monotone in :math:`\lambda`
(at :math:`h = 0.1`: 0.74 at :math:`\lambda = 0.5`, 0.48 at :math:`\lambda = 0.99`), so here
:math:`\zeta \in (0, 1)` is a fixed shape parameter and the regulariser is scaled by
:math:`\lambda / (1 - \zeta)`; at :math:`\zeta = 1 - \lambda` the scale is 1 and both the
regulariser and the weights are theirs. Zhao et al.'s mixture regulariser
:math:`f(v) = \gamma^2 / (v + \gamma/\lambda_Z)` has the closed form
:math:`v^* = 1` below :math:`(\lambda_Z\gamma/(\lambda_Z+\gamma))^2`, 0 above
:math:`\lambda_Z^2`, :math:`\gamma(1/\sqrt{h} - 1/\lambda_Z)` between; with
:math:`\lambda_Z = \sqrt\lambda` and :math:`\gamma = c \lambda_Z` it is the formula above,
whose thresholds (:math:`c^2\lambda/(1+c)^2` and :math:`\lambda`) scale with the pace.
The ``hard`` comparison :math:`h < \lambda` is exact: :math:`\lambda` is rounded up to
the hardness dtype before comparing.

Links: Kumar et al. https://papers.nips.cc/paper/3923-self-paced-learning-for-latent-variable-models ;
Jiang et al. https://doi.org/10.1145/2647868.2654918 ;
Zhao et al. https://doi.org/10.1609/aaai.v29i1.9584 .

Type aliases of the signatures:

.. py:type:: Regularizer
   :canonical: typing.Literal['hard', 'linear', 'log', 'mixture']

   The self-paced regulariser.

.. py:type:: Target
   :canonical: typing.Literal['negatives', 'anchors']

   What is weighted: the negatives of each anchor or the anchors.

.. py:type:: Hardness
   :canonical: typing.Literal['similarity', 'loss']

   How hardness is measured.

The package, one file per part: ``regularizers.py`` (:func:`self_paced_weights`, the closed
forms above), ``schedule.py`` (:class:`PaceSchedule`, the pace :math:`\lambda_t`),
``weighting.py`` (:class:`SelfPacedWeighting`, :class:`FrozenWeighting`: the weights of a
batch at the schedule's pace); ``_exact_pace.py`` (the pace compared in the hardness dtype,
quantile ranks) and ``_checks.py`` (argument checks) serve them. Import the public names from
here.
"""

from mlcl_losses.self_paced.regularizers import self_paced_weights
from mlcl_losses.self_paced.schedule import PaceSchedule
from mlcl_losses.self_paced.weighting import FrozenWeighting, SelfPacedWeighting

__all__ = [
    "FrozenWeighting",
    "PaceSchedule",
    "SelfPacedWeighting",
    "self_paced_weights",
]
