"""Training: the one engine (:mod:`.engine`), its KL schedule, the average of its weights (:mod:`.averaging`),
Ctrl-C handling, the precision of its products
(:mod:`.precision`), and several processes."""

from .engine import TrainingDiverged, TrainingInterrupted, fit
from .parallel import LightningProcesses, ReplicasDiverged, SingleProcess

__all__ = ["LightningProcesses", "ReplicasDiverged", "SingleProcess", "TrainingDiverged", "TrainingInterrupted", "fit"]
