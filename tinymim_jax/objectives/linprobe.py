"""A linear probe on a frozen encoder (MAE's main_linprobe.py: BatchNorm without affine + Linear, LARS); the
encoder rides in the state like a teacher, frozen and never saved (tinymim_jax/linprobe.py)."""

from __future__ import annotations

from tinymim_jax import features, linprobe, optim
from tinymim_jax.objectives import Objective, Setup, register
from tinymim_jax.objectives.eval import frozen_encoder, resolve_resolution


class Linprobe(Objective):
  name = "linprobe"
  data_mode = "linprobe"

  def resolve(self, config) -> None:
    """The run's batch size, epochs and lr from config.linprobe (the recipe the eval objective's probe uses too),
    and the frozen encoder's resolution."""
    lp = config.linprobe
    config.batch_size, config.total_epochs, config.warmup_epochs = lp.batch_size, lp.epochs, lp.warmup_epochs
    config.optim.base_lr, config.optim.weight_decay = lp.base_lr, lp.weight_decay
    resolve_resolution(config)

  def setup(self, config, info, *, total_steps: int, warmup_steps: int, is_main: bool) -> Setup:
    model, spec, meta = frozen_encoder(config)
    vit = features.vit_of(model)
    o, lp = config.optim, config.linprobe
    schedule = optim.lr_schedule(base_lr=o.base_lr, global_batch_size=config.batch_size, total_steps=total_steps,
                                 warmup_steps=warmup_steps, min_lr=o.min_lr, lr_scaling_batch=o.lr_scaling_batch)
    tx = linprobe.lars(schedule, momentum=lp.momentum, trust_coefficient=lp.trust_coefficient,
                       weight_decay=lp.weight_decay)
    modeldef, state = linprobe.init_state(vit, tx, dim=vit.config.embed_dim, num_classes=info.num_classes,
                                          seed=config.seed)
    train_iterator = None
    if not lp.augment:
      # Without augmentation the features never change: one pass over each split, then the probe trains (and is
      # evaluated) on them alone.
      def train_iterator(evaluator, state, start_step, steps_per_epoch):
        f_train, y_train = evaluator.cache_features(state)
        return linprobe.CacheIterator({"feature": f_train, "label": y_train}, global_batch_size=config.batch_size,
                                      seed=config.seed, start_step=start_step, steps_per_epoch=steps_per_epoch)
    return Setup(state=state, feature_spec=spec, predict=linprobe.make_predict_fn(modeldef, spec),
                 predict_keys=("params", "consts", "encoder"), head="linprobe", frozen=("encoder",),
                 step=linprobe.make_step(modeldef, tx, schedule, spec), meta=meta, train_iterator=train_iterator)


register(Linprobe())
