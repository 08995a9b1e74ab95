"""tf.data pipelines: infinite, exactly resumable train iterators and one-pass eval iterators.

Order and resumption. Everything random is a function of (seed, process_index, epoch, position):
epoch e of a process is a permutation fixed by fold_in((seed, process_index), e) (imagenet2012: shard
order plus a seeded shuffle buffer), the example at position p of that epoch is augmented with stateless
ops seeded by fold_in(., p), and tf.data runs with deterministic ordering. Every epoch is exactly
`steps_per_epoch` batches, the same on every process (the fewest examples any process holds, divided by
the local batch; the few left over are dropped per epoch). So step s is in epoch s // steps_per_epoch at
batch s % steps_per_epoch, and a run that starts at step s produces the same batches as an uninterrupted
one from there on. Cost of resuming: whole epochs are skipped arithmetically (free); inside the epoch,
digits and folder slice the epoch's index permutation (free), imagenet2012 reads and drops the records
before the resume point without decoding them (about the I/O of that part of the epoch).

Bad files. Each example is loaded and decoded inside a tf.data "try" (a one-element dataset with
ignore_errors, followed by a fallback element), which yields the example with valid=True or a 1-pixel
stand-in with valid=False (named by its path), without losing its position. An image whose header says it
has more than data.max_image_pixels pixels fails the same way, before it is decoded, so one huge file cannot
exhaust host memory. The augmentations, which cannot fail, follow
in a plain map. The Python iterator counts the invalid ones (`.skipped`) and
replaces their rows with valid rows of the same batch, so batch positions - and with them resumption and
the per-process step count - never depend on which files fail. Eval marks them mask=False instead.
"""
import dataclasses
import functools
import math
import sys

from absl import logging
import numpy as np

from tinymim_jax import periodic
from tinymim_jax.data import config as config_lib
from tinymim_jax.data import randaug
from tinymim_jax.data import sources
from tinymim_jax.data import transforms
from tinymim_jax.data._tf import tf

MODES = ('distill', 'mae_pretrain', 'finetune', 'linprobe')  # Named as the objectives they feed.
_EVAL_SPLITS = {'test': 'eval', 'val': 'eval', 'train': 'train'}


def _processes(process_index, process_count):
  if (process_index is None) != (process_count is None):
    raise ValueError('Give both process_index and process_count, or neither (then JAX provides them).')
  if process_index is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, process_count={process_count}).')
  return process_index, process_count


def _local_batch(global_batch_size, process_count):
  if global_batch_size < process_count or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} must be a positive multiple of '
                     f'process_count={process_count}.')
  return global_batch_size // process_count


def _options():
  options = tf.data.Options()
  options.deterministic = True
  # Parallelism comes from tf.data across examples; ops inside one example stay single-threaded.
  options.threading.max_intra_op_parallelism = 1
  return options


def _try_map(ds, fn, fallback, num_parallel_calls, can_fail=True):
  """ds.map(fn), except that an element whose fn raises comes out as fallback(element).

  Outputs get 'valid' (bool). Each element runs in its own one-element dataset whose errors are dropped,
  concatenated with its fallback; taking the first element is the try/except that tf.data lacks.
  interleave with block_length 1 and deterministic=True keeps the input order. can_fail=False (a split held
  decoded in memory): a plain ordered map, the same elements without the guard's per-element datasets.
  """
  if not can_fail:
    return ds.map(lambda e: dict(fn(e), valid=True), num_parallel_calls=num_parallel_calls, deterministic=True)

  def one(element):
    good = tf.data.Dataset.from_tensors(element).map(lambda e: dict(fn(e), valid=True)).ignore_errors()
    return good.concatenate(tf.data.Dataset.from_tensors(dict(fallback(element), valid=False))).take(1)

  return ds.interleave(one, cycle_length=num_parallel_calls, block_length=1,
                       num_parallel_calls=num_parallel_calls, deterministic=True)


# ---------------------------------------------------------------------------------------------------------
# Per-example transforms.


def _train_transforms(c, mode):
  """(decode, augment) for a training mode, both taking (input, per-example seed).

  decode(raw, seed) -> the RandomResizedCrop window, uint8: the part that can fail on a bad file, run
  inside the try. augment(crop, seed) -> the mode's normalised float32 (S, S, 3) views: cannot fail,
  so it runs in a plain map that tf.data fuses with batching.
  """
  # 'linprobe' (MAE's linear probe): the fine-tuning crop and flip, without RandAugment or erasing.
  scale = {'distill': c.distill_crop_scale, 'mae_pretrain': c.mae_crop_scale, 'finetune': c.ft_crop_scale,
           'linprobe': c.ft_crop_scale}[mode]
  size = c.image_size
  fill = tuple(int(round(255 * m)) for m in c.student_norm[0])  # timm's img_mean for RandAugment.
  if mode == 'finetune' and c.randaug:
    randaug.parse(c.randaug)  # Fail now, with the field named, rather than inside tf.data.

  def decode(raw, seed):
    crop_seed = transforms.split_seed(seed, 5)[0]
    window = functools.partial(transforms.rrc_window, scale=scale, ratio=c.crop_ratio, seed=crop_seed)
    return transforms.decode_and_crop(raw, window, c.max_image_pixels)  # JPEGs decode only the window.

  def augment(crop, seed):
    _, flip_seed, jitter_seed, randaug_seed, erase_seed = transforms.split_seed(seed, 5)
    image = transforms.resize(tf.cast(crop, tf.float32), size)
    if c.flip:
      image = transforms.flip(image, flip_seed)
    if mode == 'distill':  # One crop and flip for both views; only the student view is jittered.
      student = transforms.color_jitter(image, c.color_jitter, jitter_seed)
      return {'teacher': transforms.normalize(image, c.teacher_norm),
              'student': transforms.normalize(student, c.student_norm)}
    if mode == 'finetune' and c.randaug:
      image = tf.reshape(randaug.randaugment(image, c.randaug, randaug_seed, fill), [size, size, 3])
    image = transforms.normalize(image, c.student_norm)
    if mode == 'finetune':
      image = transforms.random_erasing(image, c.reprob, erase_seed)
    return {'image': image}

  return decode, augment


def _eval_transforms(c):
  """(decode, augment) for eval: full decode (inside the try), then resize + center crop + normalise."""
  def decode(raw):
    return transforms.decode_and_crop(raw, transforms.full_window, c.max_image_pixels)

  def augment(image):
    image = transforms.resize_shorter_center_crop(image, c.image_size, c.crop_pct)
    return {'image': transforms.normalize(image, c.student_norm)}

  return decode, augment


def _failed(key):
  """What the try yields for an example that failed to load or decode: a 1-pixel stand-in."""
  return {'crop': tf.zeros([1, 1, 3], tf.uint8), 'label': tf.constant(0, tf.int32), 'key': key}


# ---------------------------------------------------------------------------------------------------------
# Iterators.


def _fill_invalid(batch, valid, where, keys):
  """Replaces the rows of undecodable examples with valid rows of the same batch (cyclically)."""
  good = np.flatnonzero(valid)
  if not len(good):
    raise RuntimeError(f'Every example of the batch at {where} failed to load or decode (e.g. '
                       f'{keys[0].decode(errors="replace")}): the data, or the transform, is broken.')
  bad = np.flatnonzero(~valid)
  for k, v in batch.items():
    v = np.array(v)  # tf.data's arrays may be read-only.
    v[bad] = v[good[np.arange(len(bad)) % len(good)]]
    batch[k] = v


def _log_skipped(keys, split_name):
  for key in keys[:10]:
    logging.warning('Skipped an example of %s that is unreadable, undecodable or larger than '
                    'data.max_image_pixels: %s', split_name, key.decode(errors='replace'))


class TrainIterator:
  """Infinite iterator of host-local training batches (dicts of numpy arrays).

  Attributes: steps_per_epoch, num_classes, skipped (unreadable, undecodable or oversized examples skipped so
  far), step (the step the next batch belongs to).
  """

  def __init__(self, ds, *, steps_per_epoch, num_classes, start_step, split_name):
    self.steps_per_epoch = steps_per_epoch
    self.num_classes = num_classes
    self.skipped = 0
    self.step = start_step
    self.split_name = split_name
    self._it = ds.as_numpy_iterator()

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    valid, keys = batch.pop('valid'), batch.pop('key')
    if not valid.all():
      self.skipped += int((~valid).sum())
      _log_skipped(keys[~valid], self.split_name)
      _fill_invalid(batch, valid, f'step {self.step} of {self.split_name}', keys)
    self.step += 1
    return batch


class EvalIterator:
  """One pass over an eval split: host-local batches {'image', 'label', 'mask'} of full size.

  `mask` is False for padding and for undecodable examples (those are also counted in `skipped`).
  Every process yields `num_batches` batches, so collective eval steps stay in lockstep.
  """

  def __init__(self, ds, *, num_batches, num_local, batch_size, num_classes, split_name):
    self.num_batches = num_batches
    self.num_examples = num_local  # Real examples of this process.
    self.num_classes = num_classes
    self.skipped = 0
    self.split_name = split_name
    self._batch_size = batch_size
    self._seen = 0
    self._it = ds.as_numpy_iterator()

  def __len__(self):
    return self.num_batches

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    valid, keys = batch.pop('valid'), batch.pop('key')
    real = np.arange(self._seen, self._seen + self._batch_size) < self.num_examples
    self._seen += self._batch_size
    if (real & ~valid).any():
      self.skipped += int((real & ~valid).sum())
      _log_skipped(keys[real & ~valid], self.split_name)
    batch['mask'] = valid
    return batch


def _steps_per_epoch(name, num_examples, global_batch_size, process_count):
  _local_batch(global_batch_size, process_count)  # a batch that does not divide over the processes is an error
  return periodic.steps_per_epoch(num_examples, global_batch_size, process_count=process_count, name=name)


def steps_per_epoch(cfg, *, global_batch_size, process_count=None):
  """Training steps per epoch as make_train_iterator counts them (see the module docstring)."""
  source = sources.get(config_lib.resolve(cfg))
  _, process_count = _processes(None if process_count is None else 0, process_count)
  return _steps_per_epoch(f'{source.name} train', source.num_train, global_batch_size, process_count)


def make_train_iterator(cfg, *, mode, global_batch_size, seed, start_step=0, process_index=None,
                        process_count=None):
  """The training input: an infinite TrainIterator of this process's batches, starting at `start_step`.

  mode 'distill' -> {'teacher', 'student', 'label'}; 'mae_pretrain', 'finetune', 'linprobe' -> {'image', 'label'};
  images are float32 (global_batch_size // process_count, S, S, 3), labels int32.
  """
  if mode not in MODES:
    raise ValueError(f'mode={mode!r}: expected one of {MODES}.')
  if start_step < 0:
    raise ValueError(f'start_step={start_step}: expected >= 0.')
  c = config_lib.resolve(cfg)
  process_index, process_count = _processes(process_index, process_count)
  batch = _local_batch(global_batch_size, process_count)
  source = sources.get(c)
  split = source.split('train', process_index, process_count)
  steps_per_epoch = _steps_per_epoch(split.name, split.num_examples, global_batch_size, process_count)
  first_epoch, skip_steps = divmod(start_step, steps_per_epoch)
  per_epoch = steps_per_epoch * batch
  base_seed = tf.constant([seed % 2**63, process_index], tf.int64)

  def epoch_examples(epoch):
    order_seed, augment_seed = transforms.split_seed(transforms.fold_in(base_seed, epoch), 2)
    skip = tf.where(epoch == first_epoch, tf.constant(skip_steps * batch, tf.int64), 0)
    examples = split.epoch(order_seed, skip).take(per_epoch - skip)
    return examples.map(lambda d: {'desc': d, 'seed': augment_seed})

  decode, augment = _train_transforms(c, mode)

  def load_and_decode(e):
    ex = split.load(e['desc'])
    seed = transforms.fold_in(e['seed'], e['desc']['pos'])
    return {'crop': decode(ex['raw'], seed), 'label': ex['label'], 'key': ex['key'], 'seed': seed}

  def failed(e):
    return dict(_failed(split.key(e['desc'])), seed=transforms.fold_in(e['seed'], e['desc']['pos']))

  def views(e):
    return dict(augment(e['crop'], e['seed']), label=e['label'], key=e['key'], valid=e['valid'])

  ds = tf.data.Dataset.range(first_epoch, sys.maxsize).flat_map(epoch_examples)
  ds = _try_map(ds, load_and_decode, failed, c.num_parallel_calls, can_fail=not split.in_memory)
  ds = ds.map(views, num_parallel_calls=c.num_parallel_calls, deterministic=True)
  ds = ds.batch(batch, drop_remainder=True).prefetch(c.prefetch).with_options(_options())
  return TrainIterator(ds, steps_per_epoch=steps_per_epoch, num_classes=source.num_classes,
                       start_step=start_step, split_name=split.name)


def make_eval_iterator(cfg, *, split='test', global_batch_size, process_index=None, process_count=None):
  """One pass over `split` ('test' and 'val' both mean the held-out split) with the eval transform."""
  if split not in _EVAL_SPLITS:
    raise ValueError(f'split={split!r}: expected one of {sorted(_EVAL_SPLITS)}.')
  c = config_lib.resolve(cfg)
  process_index, process_count = _processes(process_index, process_count)
  batch = _local_batch(global_batch_size, process_count)
  source = sources.get(c)
  data = source.split(_EVAL_SPLITS[split], process_index, process_count)
  _, most = data.shares(process_count)
  num_batches = math.ceil(most / batch)  # The same on every process.
  decode, augment = _eval_transforms(c)

  def load_and_decode(d):
    ex = data.load(d)
    return {'crop': decode(ex['raw']), 'label': ex['label'], 'key': ex['key']}

  def failed(d):
    return _failed(data.key(d))

  ds = _try_map(data.epoch(None, 0), load_and_decode, failed, c.num_parallel_calls, can_fail=not data.in_memory)
  padding = dict(_failed(tf.constant('padding')), valid=False)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_batches * batch - data.num_local))
  ds = ds.map(lambda e: dict(augment(e['crop']), label=e['label'], key=e['key'], valid=e['valid']),
              num_parallel_calls=c.num_parallel_calls, deterministic=True)
  ds = ds.batch(batch, drop_remainder=True).prefetch(c.prefetch).with_options(_options())
  return EvalIterator(ds, num_batches=num_batches, num_local=data.num_local, batch_size=batch,
                      num_classes=source.num_classes, split_name=data.name)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Sizes of a dataset (name, classes, train and held-out examples, image side in pixels)."""
  name: str
  num_classes: int
  num_train: int
  num_eval: int
  image_size: int


def dataset_info(cfg):
  c = config_lib.resolve(cfg)
  source = sources.get(c)
  return DatasetInfo(name=source.name, num_classes=source.num_classes, num_train=source.num_train,
                     num_eval=source.num_eval, image_size=c.image_size)
