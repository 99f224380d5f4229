"""The learned cost model: ranks schedules of one shape by predicted run time.

The interface follows TVM's meta-schedule cost model: ``update(records)`` learns
from measurements, ``predict(schedules)`` returns log seconds (only differences
between schedules of one shape are meaningful; the environment uses ratios),
``save``/``load`` keep weights, feature normalisation and config. It prunes before
measuring: ``rank(schedules, k)`` gives the k predicted fastest, which the search
agents measure.

One module per job: ``model`` (:class:`LearnedCostModel` and its file format),
``nets`` (the networks), ``features`` (the model's own feature columns), ``data``
(samples from records and logs, splits), ``metrics`` (pairwise accuracy, top-k
recall), ``evaluate`` (cross-validation by shape). Everything is importable from
``agents.cost_model``.

**Inputs** are the environment's shape-agnostic features (``envs.features``, with
``step_fraction`` 0), so a model trained on some shapes predicts for others, and
(``nest_features``) the model's own columns of ``features``: how well vector and
parallel loops fill lanes and cores, work padded by split tails, iterations and bytes
inside each loop, the sizes of the cache_write tile and the packed buffers.

**Target.** Times are compared only within a group (op, shape, hardware): the net
predicts ``log t - median(log t of the group)``. :meth:`LearnedCostModel.predict` adds
``log(flops) + c`` back, with ``c`` the training groups' median log seconds per FLOP,
so absolute values are plausible but only within-shape differences are learned.

**Loss**: logistic loss on every pair of one group in a minibatch (minibatches are
built from chunks of single groups, so pairs are plentiful), plus ``reg_weight``
times a Huber loss on the group-relative log time, which keeps predictions on a
common scale across shapes of very different size.

**Architecture.** ``set``: a per-loop MLP over the rows (the env's 24 features, the
model's own 5 and the loop's depth from the outside and from the inside), masked sum
and max pooling, concatenated with the globals (15 and 4), an MLP head. ``mlp``: an
MLP over the flat vector. ``ensemble`` (3) such nets from different initial weights
are trained side by side and averaged. ``set`` is the default: on the first data set
of four shapes it ranked +0.06 better within a shape and +0.04 better on shapes it never
saw than ``mlp`` (the flat MLP ties weights to loop slots; the set model shares them
across loops).

On the ``ranking`` data set (``python -m experiments costmodel --shape-set ranking``:
100 schedules of each of 90 shapes of the five operators, measured on an Intel Xeon
with AVX-512, 2 cores), pooled pairwise accuracy on shapes held out (5 folds, 18
shapes each) was 0.826 for one ``set`` net on the env's features alone (60 epochs),
0.856 with the model's own columns (30 epochs; on an earlier measurement of half the
shapes 120 epochs ranked unseen shapes worse than 60 or 30), 0.861 for an ensemble of
three; re-measuring every schedule agreed with the first measurement on 0.912 of
pairs, so that is about what the labels allow. Times measured while other work ran on the machine were far noisier (down to
0.5 agreement on some shapes): generate the data on a quiet machine.

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
