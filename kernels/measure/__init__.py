"""Measurement: compile, check and time candidates on real hardware.

- :mod:`.result`: typed candidates and results, the builder/runner protocols;
- :mod:`.build`: compiles C to shared objects (a disk cache keyed by digest);
- :mod:`.worker`, :mod:`.cuda_worker`: the worker program, one check and one timing loop;
- :mod:`.runner`: runs the worker, survives kernels that crash or hang;
- :mod:`.measurer`: the front door, :class:`Measurer`;
- :mod:`.cluster`: the same protocols on a Ray cluster;
- :mod:`.library`: the vendor library each operator is compared against;
- :mod:`.tuning_log`: the append-only log of measurements.
"""

from .build import Builder
from .measurer import Measurer
from .result import BuildResult, Candidate, MeasureResult
from .runner import Runner

__all__ = ["Builder", "BuildResult", "Candidate", "Measurer", "MeasureResult", "Runner"]
