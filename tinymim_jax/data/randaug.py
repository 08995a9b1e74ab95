"""timm's RandAugment ('rand-m9-mstd0.5-inc1') in TensorFlow.

All 15 ops of timm's op sets are here, with timm's level -> argument maps and PIL's pixel semantics:
AutoContrast, Equalize, Invert, Rotate, Posterize(Increasing), Solarize(Increasing), SolarizeAdd,
Color / Contrast / Brightness / Sharpness (and their Increasing forms), ShearX/Y, TranslateX/YRel.
Per layer (2 by default): one op drawn uniformly with replacement, applied with probability 0.5, magnitude
~ N(m, mstd) clipped to [0, 10], signed ops negated with probability 1/2. Known differences from timm:
geometric ops sample bilinearly (timm: bicubic; TF's projective transform has no bicubic) and values are
rounded to integers after each op rather than truncated the way some PIL ops do.
"""
import math
import re

from tinymim_jax.data import transforms
from tinymim_jax.data._tf import tf

_MAX_LEVEL = 10.0
_TRANSLATE_PCT = 0.45  # timm hparams default for the *Rel translations.

_INCREASING = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
               'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
               'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
_ORIGINAL = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd', 'Color',
             'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


def parse(spec):
  """'rand-m9-mstd0.5-inc1' -> dict(num_layers, magnitude, magnitude_std, prob, ops), as timm parses it."""
  parts = spec.split('-')
  if parts[0] != 'rand':
    raise ValueError(f'data.randaug={spec!r}: expected a timm RandAugment string such as '
                     "'rand-m9-mstd0.5-inc1'.")
  out = dict(num_layers=2, magnitude=10.0, magnitude_std=0.0, prob=0.5, ops=_ORIGINAL)
  for part in parts[1:]:
    key, value = (re.split(r'(\d.*)', part) + ['', ''])[:2]
    if key == 'm':
      out['magnitude'] = float(value)
    elif key == 'n':
      out['num_layers'] = int(value)
    elif key == 'mstd':
      out['magnitude_std'] = float(value)
    elif key == 'p':
      out['prob'] = float(value)
    elif key == 'inc':
      out['ops'] = _INCREASING if int(value) else _ORIGINAL
    else:
      raise ValueError(f'data.randaug={spec!r}: unsupported section {part!r} (supported: m, n, mstd, p, inc).')
  return out


def randaugment(image, spec, seed, fill):
  """Applies RandAugment `spec` to a (H, W, 3) float image in [0, 255]; `fill` is the RGB fill colour."""
  p = parse(spec)
  ops = [_OPS[name] for name in p['ops']]
  for layer_seed in transforms.split_seed(seed, p['num_layers']):
    op_seed, apply_seed, mag_seed, sign_seed = transforms.split_seed(layer_seed, 4)
    index = tf.random.stateless_uniform([], op_seed, 0, len(ops), dtype=tf.int32, alg='philox')
    index = tf.where(transforms.uniform([], apply_seed) < p['prob'], index, len(ops))  # len(ops): skip.
    level = p['magnitude'] + p['magnitude_std'] * tf.random.stateless_normal([], mag_seed, alg='philox')
    level = tf.clip_by_value(level, 0.0, _MAX_LEVEL) / _MAX_LEVEL
    sign = tf.where(transforms.uniform([], sign_seed) > 0.5, -1.0, 1.0)  # timm's _randomly_negate.
    branches = [lambda op=op: tf.round(op(image, level, sign, fill)) for op in ops] + [lambda: image]
    image = tf.switch_case(index, branches)
  return image


# ---------------------------------------------------------------------------------------------------------
# The ops: (image, level in [0, 1], sign +-1, fill) -> image.


def _auto_contrast(image, *_):
  lo = tf.reduce_min(image, axis=[0, 1])
  hi = tf.reduce_max(image, axis=[0, 1])
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  return tf.where(hi > lo, tf.clip_by_value(tf.floor((image - lo) * scale), 0.0, 255.0), image)


def _equalize(image, *_):
  """PIL ImageOps.equalize, per channel."""
  pixels = tf.transpose(tf.reshape(tf.cast(image, tf.int32), [-1, 3]))  # (3, H*W)
  hist = tf.math.bincount(pixels, minlength=256, maxlength=256, axis=-1)  # (3, 256)
  last_nonzero = tf.reduce_max(tf.where(hist > 0, tf.range(256), -1), axis=-1)
  step = (tf.reduce_sum(hist, axis=-1) - tf.gather(hist, last_nonzero, batch_dims=1)) // 255
  safe_step = tf.maximum(step, 1)[:, None]
  lut = tf.minimum((safe_step // 2 + tf.cumsum(hist, axis=-1, exclusive=True)) // safe_step, 255)
  keep = (tf.math.count_nonzero(hist, axis=-1) <= 1) | (step == 0)  # PIL leaves these channels as is.
  lut = tf.where(keep[:, None], tf.range(256), lut)
  out = tf.transpose(tf.gather(lut, pixels, batch_dims=1))
  return tf.reshape(tf.cast(out, tf.float32), tf.shape(image))


def _invert(image, *_):
  return 255.0 - image


def _posterize(image, bits):
  shift = 2.0 ** tf.cast(8 - bits, tf.float32)  # Keep `bits` most significant bits.
  return tf.floor(image / shift) * shift


def _solarize(image, threshold):
  return tf.where(image < threshold, image, 255.0 - image)


def _solarize_add(image, level, *_):
  add = tf.minimum(128.0, tf.floor(level * 110.0))
  return tf.where(image < 128.0, tf.minimum(255.0, image + add), image)


def _color(image, factor):
  return transforms.blend(tf.round(transforms.grayscale(image)), image, factor)


def _contrast(image, factor):
  mean = tf.floor(tf.reduce_mean(tf.round(transforms.grayscale(image))) + 0.5)
  return transforms.blend(mean, image, factor)


def _brightness(image, factor):
  return transforms.blend(tf.zeros_like(image), image, factor)


def _sharpness(image, factor):
  """PIL ImageEnhance.Sharpness: blend with the SMOOTH-filtered image; border pixels stay as they are."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
  interior = tf.pad(tf.ones_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]]) > 0
  return transforms.blend(tf.where(interior, smooth, image), image, factor)


def _affine(image, coefficients, fill):
  """PIL Image.transform(AFFINE, (a, b, c, d, e, f)): output (x, y) samples input (ax+by+c, dx+ey+f).

  PIL works at pixel centers (x + 0.5); TF's projective transform at integer indices, hence the shift.
  The per-channel fill is applied by transforming image - fill with a zero fill.
  """
  a, b, c, d, e, f = coefficients
  c = a * 0.5 + b * 0.5 + c - 0.5
  f = d * 0.5 + e * 0.5 + f - 0.5
  zero = tf.zeros_like(a)
  matrix = tf.cast(tf.stack([a, b, c, d, e, f, zero, zero])[None], tf.float32)
  fill = tf.constant(fill, tf.float32)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=(image - fill)[None], transforms=matrix, output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation='BILINEAR', fill_mode='CONSTANT')[0]
  return tf.clip_by_value(out + fill, 0.0, 255.0)


def _rotate(image, level, sign, fill):
  """PIL Image.rotate(degrees): counter-clockwise about the image center."""
  angle = -math.radians(30.0) * level * sign
  height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  cx, cy = width / 2.0, height / 2.0
  a, b, d, e = tf.cos(angle), tf.sin(angle), -tf.sin(angle), tf.cos(angle)
  c = a * -cx + b * -cy + cx
  f = d * -cx + e * -cy + cy
  return _affine(image, (a, b, c, d, e, f), fill)


def _shear(axis):
  def op(image, level, sign, fill):
    shear = 0.3 * level * sign
    one, zero = tf.ones_like(shear), tf.zeros_like(shear)
    coefficients = (one, shear, zero, zero, one, zero) if axis == 'x' else (one, zero, zero, shear, one, zero)
    return _affine(image, coefficients, fill)
  return op


def _translate_rel(axis):
  def op(image, level, sign, fill):
    pct = _TRANSLATE_PCT * level * sign
    one, zero = tf.ones_like(pct), tf.zeros_like(pct)
    if axis == 'x':
      coefficients = (one, zero, pct * tf.cast(tf.shape(image)[1], tf.float32), zero, one, zero)
    else:
      coefficients = (one, zero, zero, zero, one, pct * tf.cast(tf.shape(image)[0], tf.float32))
    return _affine(image, coefficients, fill)
  return op


def _enhance(op, increasing):
  if increasing:  # Factor 1 -/+ 0.9 level, at least 0.1.
    return lambda image, level, sign, _: op(image, tf.maximum(0.1, 1.0 + 0.9 * level * sign))
  return lambda image, level, *_: op(image, 1.8 * level + 0.1)  # Factor in [0.1, 1.9].


_OPS = {
    'AutoContrast': _auto_contrast,
    'Equalize': _equalize,
    'Invert': _invert,
    'Rotate': _rotate,
    'Posterize': lambda image, level, *_: _posterize(image, tf.floor(level * 4.0)),
    'PosterizeIncreasing': lambda image, level, *_: _posterize(image, 4.0 - tf.floor(level * 4.0)),
    'Solarize': lambda image, level, *_: _solarize(image, tf.minimum(256.0, tf.floor(level * 256.0))),
    'SolarizeIncreasing': lambda image, level, *_: _solarize(
        image, 256.0 - tf.minimum(256.0, tf.floor(level * 256.0))),
    'SolarizeAdd': _solarize_add,
    'Color': _enhance(_color, False),
    'ColorIncreasing': _enhance(_color, True),
    'Contrast': _enhance(_contrast, False),
    'ContrastIncreasing': _enhance(_contrast, True),
    'Brightness': _enhance(_brightness, False),
    'BrightnessIncreasing': _enhance(_brightness, True),
    'Sharpness': _enhance(_sharpness, False),
    'SharpnessIncreasing': _enhance(_sharpness, True),
    'ShearX': _shear('x'),
    'ShearY': _shear('y'),
    'TranslateXRel': _translate_rel('x'),
    'TranslateYRel': _translate_rel('y'),
}
