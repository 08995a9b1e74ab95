"""The `data` sub-config: defaults, and the checked form the pipeline reads."""
import dataclasses
import typing
from typing import Optional

import ml_collections
from ml_collections import config_dict

IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NAMES = ('digits', 'fashion_mnist', 'imagenet2012', 'folder')
AUTOTUNE = -1  # == tf.data.AUTOTUNE, spelled out so that configs need not import TF.


@dataclasses.dataclass(frozen=True)
class Config:
  """The data fields with their defaults (the one list of them), as the pipeline reads them once checked."""
  name: str = 'digits'  # 'digits' (scikit-learn, embedded) | 'fashion_mnist' | 'imagenet2012' (TFDS) | 'folder'.
  data_dir: Optional[str] = None  # TFDS data dir; None = TFDS default.
  manual_dir: Optional[str] = None  # Holds ILSVRC2012_img_{train,val}.tar to prepare from.
  folder: Optional[str] = None  # Root of root/train/<class>/* and optional root/val/<class>/*.
  # fashion_mnist: directory of {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz. None: the Debian package's
  # /usr/share/datasets/fashion-mnist when present, else TFDS fashion_mnist prepared in data_dir.
  idx_dir: Optional[str] = None
  image_size: int = 224
  crop_pct: float = 0.875  # Eval: resize the shorter side to round(image_size / crop_pct), center crop.
  # (mean, std) in [0, 1] pixel units. The teacher and the student may expect different statistics.
  teacher_norm: tuple = IMAGENET_NORM
  student_norm: tuple = IMAGENET_NORM  # Also used by 'mae_pretrain', 'finetune' and eval.
  flip: bool = True  # Random horizontal flip in every training mode (off for data where it changes the class).
  crop_ratio: tuple = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio range (torchvision default).
  distill_crop_scale: tuple = (0.2, 1.0)
  color_jitter: float = 0.4  # Brightness = contrast = saturation strength, student view only; 0 = off.
  mae_crop_scale: tuple = (0.2, 1.0)
  ft_crop_scale: tuple = (0.08, 1.0)
  randaug: str = 'rand-m9-mstd0.5-inc1'  # timm syntax; '' = off.
  reprob: float = 0.25  # Random erasing probability (pixel mode, on the normalised image).
  shuffle_buffer: int = 10_000  # Records; only imagenet2012 (the others shuffle exactly by index).
  num_parallel_calls: int = AUTOTUNE
  prefetch: int = 2  # Batches.
  cache: Optional[bool] = None  # Hold decoded/encoded examples in memory. None: digits if < 64 MB.
  # Larger images (height x width, read from the file header before decoding) are skipped and counted like
  # undecodable ones, so one huge file cannot exhaust host memory. PIL's default limit (Image.MAX_IMAGE_PIXELS).
  max_image_pixels: int = 89_478_485
  digits_test_fraction: float = 0.2
  digits_split_seed: int = 0  # Fixes the stratified digits train/test split.
  # Low-label training: a class-balanced fraction of the train split (the first round(fraction x n_c) images of
  # each class c, in an order fixed by train_subset_seed; at least one per class). 1.0 = all of it. Every
  # train-split reader (training, k-NN neighbours, probes) sees the subset; the held-out split is unchanged.
  train_fraction: float = 1.0
  train_subset_seed: int = 0


def default_config():
  """All data fields with their defaults (`Config`'s) as a ConfigDict; experiment configs start from this.

  Fields whose default is None are typed placeholders, so the command line can still set them.
  """
  c = ml_collections.ConfigDict()
  for f in dataclasses.fields(Config):
    if f.default is None:  # Optional[T]: a placeholder of type T.
      c[f.name] = config_dict.placeholder(next(t for t in typing.get_args(f.type) if t is not type(None)))
    else:
      c[f.name] = f.default
  return c


def _fields_of(cfg):
  if isinstance(cfg, Config):
    return dataclasses.asdict(cfg)
  if isinstance(cfg, (ml_collections.ConfigDict, dict)):
    return dict(cfg.items())
  return {k: v for k, v in vars(cfg).items() if not k.startswith('_')}


def resolve(cfg=None):
  """Returns a checked `Config` from a ConfigDict, dict or attribute object; missing fields get defaults."""
  fields = dict(default_config().items())
  given = _fields_of(cfg) if cfg is not None else {}
  unknown = sorted(set(given) - set(fields))
  if unknown:
    raise ValueError(f'Unknown data config field(s) {unknown}; known fields: {sorted(fields)}.')
  fields.update(given)
  c = Config(**fields)
  _check(c)
  return c


def _pair(c, field, lo=None, hi=None):
  v = getattr(c, field)
  if len(v) != 2 or not v[0] <= v[1] or (lo is not None and v[0] < lo) or (hi is not None and v[1] > hi):
    raise ValueError(f'data.{field}={v!r}: expected (low, high) with {lo} <= low <= high <= {hi}.')


def _check(c):
  if c.name not in NAMES:
    raise ValueError(f'data.name={c.name!r}: expected one of {NAMES}.')
  if c.name == 'folder' and not c.folder:
    raise ValueError("data.name='folder' needs data.folder, the root of <root>/train/<class>/*.")
  if not isinstance(c.image_size, int) or c.image_size < 1:
    raise ValueError(f'data.image_size={c.image_size!r}: expected a positive int.')
  if not 0 < c.crop_pct <= 1:
    raise ValueError(f'data.crop_pct={c.crop_pct!r}: expected 0 < crop_pct <= 1.')
  for field in ('teacher_norm', 'student_norm'):
    norm = getattr(c, field)
    if len(norm) != 2 or any(len(v) != 3 for v in norm) or min(norm[1]) <= 0:
      raise ValueError(f'data.{field}={norm!r}: expected ((m_r, m_g, m_b), (s_r, s_g, s_b)) with s > 0.')
  for field in ('distill_crop_scale', 'mae_crop_scale', 'ft_crop_scale'):
    _pair(c, field, 0.0, 1.0)
    if getattr(c, field)[1] <= 0:
      raise ValueError(f'data.{field}={getattr(c, field)!r}: the largest crop must be > 0.')
  _pair(c, 'crop_ratio', 1e-6)
  if c.color_jitter < 0:
    raise ValueError(f'data.color_jitter={c.color_jitter!r}: expected >= 0.')
  if not 0 <= c.reprob <= 1:
    raise ValueError(f'data.reprob={c.reprob!r}: expected a probability.')
  if not 0 < c.digits_test_fraction < 1:
    raise ValueError(f'data.digits_test_fraction={c.digits_test_fraction!r}: expected 0 < f < 1.')
  if c.shuffle_buffer < 1 or c.prefetch < 0:
    raise ValueError(f'data.shuffle_buffer={c.shuffle_buffer}, data.prefetch={c.prefetch}: '
                     'expected >= 1 and >= 0.')
  if c.num_parallel_calls != AUTOTUNE and c.num_parallel_calls < 1:
    raise ValueError(f'data.num_parallel_calls={c.num_parallel_calls}: expected >= 1 or -1 (AUTOTUNE).')
  if not isinstance(c.max_image_pixels, int) or c.max_image_pixels < 1:
    raise ValueError(f'data.max_image_pixels={c.max_image_pixels!r}: expected a positive int.')
  if not isinstance(c.digits_split_seed, int) or c.digits_split_seed < 0:
    raise ValueError(f'data.digits_split_seed={c.digits_split_seed!r}: expected an int >= 0.')
  if not 0 < c.train_fraction <= 1:
    raise ValueError(f'data.train_fraction={c.train_fraction!r}: expected 0 < fraction <= 1 (e.g. 0.01 for 1% '
                     'of the labels).')
  if not isinstance(c.train_subset_seed, int) or c.train_subset_seed < 0:
    raise ValueError(f'data.train_subset_seed={c.train_subset_seed!r}: expected an int >= 0.')
  if c.name == 'imagenet2012' and c.train_fraction < 1:
    raise ValueError("data.train_fraction < 1 is not supported for imagenet2012 (its labels are not read up "
                     "front); use a folder of the subset (data.name='folder').")
  if c.name == 'imagenet2012' and c.cache:
    raise ValueError('data.cache=True is not supported for imagenet2012 (about 150 GB); leave it None.')
