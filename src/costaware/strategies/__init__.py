"""What a run does once more training is not worth its cost: ``MarginalGainStopping(then=...)``.

``EarlyStop`` (stop, keep the best weights), ``Distill`` (train a compact student on the
teacher's soft targets; by default a ``TruncatedStudent``, the teacher with fewer layers),
``Quantize`` (int8/4-bit linear layers, with bitsandbytes or torch's dynamic int8, kept only if it
pays). With a ``costaware.deploy.Deployment``, the model to serve is chosen by lifetime value. These are
not Lightning ``Strategy`` objects. A strategy subclasses :class:`StopStrategy`: ``on_stop`` at
the stop, ``after_fit`` at the end of the fit (returning rows for the report's model table);
``MarginalGainStopping`` also calls, when a strategy defines them, ``on_train_start(context)``
(check the configuration before anything is spent) and ``on_validation(context, value)`` (each
validation's monitored value, e.g. to keep the best weights).

Example::

    from costaware import MarginalGainStopping
    from costaware.strategies import Distill, Quantize

    stopping = MarginalGainStopping(monitor="val_acc", usd_per_point=0.01,
                                    then=Distill(student, then=Quantize(bits=8)))
"""

from costaware.strategies.base import ModelRow, StopContext, StopStrategy
from costaware.strategies.distill import Distill, StudentShapeError
from costaware.strategies.early_stop import EarlyStop
from costaware.strategies.quantize import QuantizationUnavailableError, Quantize
from costaware.strategies.students import NoLayerStackError, TruncatedStudent

__all__ = [
           "Distill",
           "EarlyStop",
           "ModelRow",
           "NoLayerStackError",
           "QuantizationUnavailableError",
           "Quantize",
           "StopContext",
           "StopStrategy",
           "StudentShapeError",
           "TruncatedStudent",
]
