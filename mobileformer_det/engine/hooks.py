"""Training hooks that tell the data loader where training is."""
from detectron2.engine import hooks

__all__ = ["DataProgress"]


class DataProgress(hooks.HookBase):
    """Writes the iteration about to run into ``progress``, the shared tensor that the training
    mapper's schedules (``INPUT.MOSAIC.UNTIL_ITER``, ``INPUT.DFINE_AUG.UNTIL_ITER``) read in every
    data loader worker. Workers map a few batches ahead (prefetching), so a schedule's switch
    reaches the model a few steps late."""

    def __init__(self, progress):
        self._progress = progress

    def before_step(self):  # the first one runs before the loader's workers start: a resume's iteration reaches them
        self._progress.fill_(self.trainer.iter)
