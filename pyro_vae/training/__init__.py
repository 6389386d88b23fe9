"""Training: the one engine (:mod:`.engine`), its KL schedule, the average of its weights (:mod:`.averaging`),
Ctrl-C handling, the precision of its products
(:mod:`.precision`), and several processes."""

from .engine import TrainingDiverged, TrainingInterrupted, fit
from .parallel import LightningProcesses, ProcessFailed, ReplicasDiverged, SingleProcess

__all__ = [
    "LightningProcesses",
    "ProcessFailed",
    "ReplicasDiverged",
    "SingleProcess",
    "TrainingDiverged",
    "TrainingInterrupted",
    "fit",
]
