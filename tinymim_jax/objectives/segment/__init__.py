"""Semantic segmentation (UperNet on a ViT, the paper's ADE20K protocol; docs/method.md section 10): pure-jnp losses and
metrics, slide inference, the authors' layer-wise lr decay and warmup + poly schedule, and the train step.

The model is models/segmentation.Segmenter; the data (ADE20K, image / mask folders, the digits scenes) live in
tinymim_jax/data/segmentation.py.
"""

from tinymim_jax.objectives.segment.inference import slide_areas, slide_inference
from tinymim_jax.objectives.segment.losses import cross_entropy, segment_loss
from tinymim_jax.objectives.segment.metrics import area_metrics, intersect_and_union
from tinymim_jax.objectives.segment.optim import layer_id, lr_scales, make_optimizer, warmup_poly_schedule
from tinymim_jax.objectives.segment.step import init_state, make_train_step, merge

__all__ = ["slide_areas", "slide_inference", "cross_entropy", "segment_loss", "area_metrics", "intersect_and_union",
           "layer_id", "lr_scales", "make_optimizer", "warmup_poly_schedule", "init_state", "make_train_step", "merge"]
from tinymim_jax.objectives.segment.objective import SEGMENTER_EXPORT, CLASSES_FILE, Segment, SegmentEvaluator, segmenter_tensors  # noqa: E402  (registers objective 'segment')
