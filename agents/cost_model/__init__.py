"""The learned cost model: ranks schedules of one shape by predicted run time.

The interface follows TVM's meta-schedule cost model: ``update(records)`` learns
from measurements, ``predict(schedules)`` returns log seconds (only differences
between schedules of one shape are meaningful; the environment uses ratios),
``save``/``load`` keep weights, feature normalisation and config. It prunes before
measuring: ``rank(schedules, k)`` gives the k predicted fastest, which the search
agents measure.

One module per job: ``model`` (:class:`LearnedCostModel` and its file format),
``nets`` (the networks), ``data`` (samples from records and logs, splits),
``metrics`` (pairwise accuracy, top-k recall), ``evaluate`` (cross-validation by
shape). Everything is importable from ``agents.cost_model``.

**Inputs** are the environment's shape-agnostic features (``envs.features``, with
``step_fraction`` 0), so a model trained on some shapes predicts for others.

**Target.** Times are compared only within a group (op, shape, hardware): the net
predicts ``log t - median(log t of the group)``. :meth:`LearnedCostModel.predict` adds
``log(flops) + c`` back, with ``c`` the training groups' median log seconds per FLOP,
so absolute values are plausible but only within-shape differences are learned.

**Loss**: logistic loss on every pair of one group in a minibatch (minibatches are
built from chunks of single groups, so pairs are plentiful), plus ``reg_weight``
times a Huber loss on the group-relative log time, which keeps predictions on a
common scale across shapes of very different size.

**Architecture.** ``set``: a per-loop MLP over the rows (24 features plus the
loop's depth from the outside and from the inside), masked sum and max pooling,
concatenated with the 15 global features, an MLP head. ``mlp``: an MLP over the
flat 303-vector. Measured on 489 correct random schedules of four shapes (two
matmuls, two conv2d; ``python -m experiments costmodel --logs /tmp/cm_data/*.jsonl
--out M --compare --epochs 60 --seed S`` for seeds 0-4, data from the command's
``--generate``), held-out pairwise accuracy (top-10 recall) was

=========  =========================  ==========================
arch       by schedule (20% of each)  by shape (leave one out)
=========  =========================  ==========================
set        0.750 +- 0.018 (0.72)      0.741
mlp        0.691 +- 0.034 (0.64)      0.698
=========  =========================  ==========================

so ``set`` is the default: +0.06 within a shape, +0.04 on shapes it never saw
(the flat MLP ties weights to loop slots; the set model shares them across
loops). On that noisy shared machine, re-measuring the 183 correct schedules of
one shape agreed with the first measurement on only 0.80 of pairs, so both are
close to what those labels allow.

Normalisation (per feature mean and std; loop rows share one set of statistics)
is taken from the training data, and recomputed whenever that data has doubled
since, so an online model starting from a handful of records settles quickly.
Everything is seeded; CPU only.
"""


from .data import Group, Sample, records_from_logs, split, to_samples
from .evaluate import cross_validate_by_shape
from .metrics import pairwise_accuracy_of, ranking_metrics, top_k_recall_of
from .model import FORMAT, VERSION, CostModelConfig, CostModelError, LearnedCostModel
from .nets import ARCHS, FlatNet, SetNet

__all__ = ["ARCHS", "FORMAT", "VERSION", "CostModelConfig", "CostModelError", "FlatNet", "Group",
           "LearnedCostModel", "Sample", "SetNet", "cross_validate_by_shape", "pairwise_accuracy_of",
           "ranking_metrics", "records_from_logs", "split", "to_samples", "top_k_recall_of"]
