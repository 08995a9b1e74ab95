"""Input pipelines for distillation, MAE pretraining and fine-tuning.

The only part of the project that uses TensorFlow (tf.data, TFDS), and only once a pipeline is built:
importing this package imports neither. `to_global` and `mixup_cutmix` are JAX-only.

  it = data.make_train_iterator(cfg, mode='distill', global_batch_size=4096, seed=0, start_step=step)
  batch = data.to_global(next(it), mesh)            # {'teacher', 'student', 'label'} as global arrays
  ev = data.make_eval_iterator(cfg, split='val', global_batch_size=1024)   # {'image', 'label', 'mask'}
"""
from tinymim_jax.data.config import default_config
from tinymim_jax.data.device import mixup_cutmix, to_global


def make_train_iterator(cfg, *, mode, global_batch_size, seed, start_step=0, process_index=None,
                        process_count=None):
  """The training input: an infinite iterator of host-local numpy batches.

  mode (the objective it feeds) 'distill' -> {'teacher', 'student', 'label'}; 'mae_pretrain', 'finetune',
  'linprobe' -> {'image', 'label'}; images float32 (global_batch_size // process_count, S, S, 3), labels int32.
  Starting at `start_step` gives the
  batches an uninterrupted run sees from that step on. The iterator has .steps_per_epoch, .skipped
  (unreadable, undecodable or oversized files skipped so far) and .num_classes.
  """
  from tinymim_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (imports TF)
  return pipeline.make_train_iterator(
      cfg, mode=mode, global_batch_size=global_batch_size, seed=seed, start_step=start_step,
      process_index=process_index, process_count=process_count)


def make_eval_iterator(cfg, *, split='test', global_batch_size, process_index=None, process_count=None):
  """One pass over `split` ('test' and 'val': the held-out split; 'train') with the eval transform.

  Batches {'image', 'label', 'mask'}; the last is padded to full size with mask False, and every process
  yields the same number of batches. Every example is seen exactly once across processes.
  """
  from tinymim_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (imports TF)
  return pipeline.make_eval_iterator(cfg, split=split, global_batch_size=global_batch_size,
                                     process_index=process_index, process_count=process_count)


def steps_per_epoch(cfg, *, global_batch_size, process_count=None):
  """Training steps per epoch, as the train iterator counts them: every process's smallest share of the train
  split in whole local batches (process_count: JAX's by default). Raises ValueError below one batch."""
  from tinymim_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (imports TF)
  return pipeline.steps_per_epoch(cfg, global_batch_size=global_batch_size, process_count=process_count)


def dataset_info(cfg):
  """name, num_classes, num_train, num_eval, image_size of the configured dataset."""
  from tinymim_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (imports TF)
  return pipeline.dataset_info(cfg)

