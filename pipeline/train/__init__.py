"""Training: `train(RunConfig) -> metrics`, one run on DeepSpeed, in one process or under any launcher.

Owns the loop, the engine pieces (device, process group, optimizer, schedule), checkpoints sealed with
manifests and exact resume, and the tags and cost metrics a run is tracked with. Knows nothing of Ray.
"""

from pipeline.train.loop import METRICS_FILE, StopTraining, train

__all__ = ["METRICS_FILE", "StopTraining", "train"]
