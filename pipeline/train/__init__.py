"""Training: `train(RunConfig) -> metrics`, one run on DeepSpeed, in one process or under any launcher.

Owns the loop, the engine pieces (device, process group, optimizer, schedule), checkpoints with verified
manifests and exact resume, and the tags and cost metrics a run is tracked with. Knows nothing of Ray.
"""

from pipeline.train.checkpoint import latest_checkpoint, load_model, resolve_checkpoint
from pipeline.train.loop import METRICS_FILE, StopTraining, train

__all__ = ["METRICS_FILE", "StopTraining", "latest_checkpoint", "load_model", "resolve_checkpoint", "train"]
