"""Detectron2's COCO evaluator over the images that could be read."""
from detectron2.evaluation import COCOEvaluator

__all__ = ["ReadableCOCOEvaluator"]


class ReadableCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` over the images that were read.

    An image the mapper could not read (it marks the input ``unreadable``, see
    :class:`~mobileformer_det.data.DetrDatasetMapper`), and one left out for a missing file, gets no
    prediction; COCOeval is then restricted to the images that have one, instead of counting every
    object of an unread image as missed. A warning says how many were left out. With every image
    read, this is ``COCOEvaluator`` exactly.
    """

    def process(self, inputs, outputs):
        read = [(i, o) for i, o in zip(inputs, outputs) if not i.get("unreadable")]
        if read:
            super().process(*map(list, zip(*read)))

    def _eval_predictions(self, predictions, img_ids=None):
        if img_ids is None and hasattr(self, "_coco_api"):
            evaluated = sorted({p["image_id"] for p in predictions})
            total = len(self._coco_api.getImgIds())
            if len(evaluated) < total:
                self._logger.warning(f"evaluating {len(evaluated)} of the {total} images of the dataset: the "
                                     f"others could not be read (see the warnings above)")
                img_ids = evaluated
        return super()._eval_predictions(predictions, img_ids=img_ids)
