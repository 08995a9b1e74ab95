"""Per-example image ops in TensorFlow, with torchvision / timm semantics.

Images are float32 (H, W, 3) in [0, 255] until `normalize`. Randomness is stateless: each op takes a (2,)
int64 seed, so an example's augmentation depends only on the seed it is given, not on thread timing.
"""
import math

from tinymim_jax.data._tf import tf

_ALG = 'philox'  # Fixed rather than 'auto_select', so that results never depend on the device.


def split_seed(seed, num):
  return tf.unstack(tf.random.experimental.stateless_split(seed, num, alg=_ALG))


def fold_in(seed, data):
  return tf.random.experimental.stateless_fold_in(seed, tf.cast(data, tf.int64), alg=_ALG)


def uniform(shape, seed, minval=0.0, maxval=1.0):
  return tf.random.stateless_uniform(shape, seed, minval, maxval, alg=_ALG)


def permutation(n, seed):
  """A random permutation of range(n) (int64), fixed by seed."""
  return tf.cast(tf.argsort(uniform([n], seed), stable=True), tf.int64)


# ---------------------------------------------------------------------------------------------------------
# Decoding and cropping.


def _bytes(raw, pos, n):
  """Bytes [pos, pos + n) of a string as int64 values 0..255 (fewer if the string is shorter)."""
  return tf.cast(tf.io.decode_raw(tf.strings.substr(raw, pos, n), tf.uint8), tf.int64)


def _le(b, start, n):
  return sum(b[start + k] * (256 ** k) for k in range(n))


def _be(b, start, n):
  return sum(b[start + k] * (256 ** (n - 1 - k)) for k in range(n))


def image_size(raw):
  """(height, width) int64 of an encoded image from its header, without decoding it; (0, 0) for a format
  tf.io.decode_image does not read. Layouts: JPEG SOF (tf.image.extract_jpeg_shape), PNG IHDR, GIF logical
  screen, BMP DIB header, WebP VP8X / VP8L / VP8 (lossy) headers. A truncated header raises InvalidArgument."""
  magic = tf.strings.substr(raw, 0, 4)

  def jpeg():
    shape = tf.cast(tf.image.extract_jpeg_shape(raw), tf.int64)
    return shape[0], shape[1]

  def png():  # signature (8) | IHDR length (4) | 'IHDR' | width (4, big-endian) | height (4)
    b = _bytes(raw, 16, 8)
    return _be(b, 4, 4), _be(b, 0, 4)

  def gif():  # 'GIF87a' / 'GIF89a' | width (2, little-endian) | height (2)
    b = _bytes(raw, 6, 4)
    return _le(b, 2, 2), _le(b, 0, 2)

  def bmp():  # 'BM' ... DIB header at 14: size (4) | width | height (2 each for the 12-byte OS/2 header, else 4)
    b = _bytes(raw, 14, 12)
    core = tf.equal(_le(b, 0, 4), 12)
    width = tf.where(core, _le(b, 4, 2), _le(b, 4, 4))
    height = tf.where(core, _le(b, 6, 2), _le(b, 8, 4))
    height = tf.where(height >= 2**31, 2**32 - height, height)  # negative = top-down rows
    return height, width

  def webp():  # 'RIFF' size 'WEBP' | chunk fourcc at 12
    chunk = tf.strings.substr(raw, 12, 4)
    vp8x, vp8l, vp8 = _bytes(raw, 24, 6), _bytes(raw, 21, 4), _bytes(raw, 26, 4)

    def extended():  # canvas width - 1, height - 1: 3 bytes each
      return _le(vp8x, 3, 3) + 1, _le(vp8x, 0, 3) + 1

    def lossless():  # 14 bits width - 1, 14 bits height - 1
      bits = _le(vp8l, 0, 4)
      return (bits // 2**14) % 2**14 + 1, bits % 2**14 + 1

    def lossy():  # after the 3-byte start code: 14-bit width and height (2 scale bits each)
      return _le(vp8, 2, 2) % 2**14, _le(vp8, 0, 2) % 2**14

    return tf.case([(tf.equal(chunk, 'VP8X'), extended), (tf.equal(chunk, 'VP8L'), lossless)], default=lossy)

  def unknown():
    return tf.constant(0, tf.int64), tf.constant(0, tf.int64)

  return tf.case([
      (tf.io.is_jpeg(raw), jpeg),
      (tf.equal(magic, b'\x89PNG'), png),
      (tf.equal(tf.strings.substr(raw, 0, 3), b'GIF'), gif),
      (tf.equal(tf.strings.substr(raw, 0, 2), b'BM'), bmp),
      (tf.equal(magic, b'RIFF') & tf.equal(tf.strings.substr(raw, 8, 4), b'WEBP'), webp),
  ], default=unknown, exclusive=False)


def _gif_frames_pixels(raw):
  """int64 sum of width x height over every frame (image descriptor) of a GIF, read by walking its blocks
  (GIF89a spec: header 13 bytes + global colour table; blocks 0x2C image (descriptor 9 bytes, local colour table,
  LZW code size, data sub-blocks), 0x21 extension (label, sub-blocks), 0x3B trailer). giflib allocates a raster
  of each frame's size, whatever the logical screen says. One loop iteration per block or data sub-block."""
  n = tf.cast(tf.strings.length(raw), tf.int64)
  data = tf.strings.join([raw, tf.constant(b'\x00' * 16)])  # reads past the end see zeros, not an error

  def table(flags):  # a colour table follows when bit 7 is set: 3 * 2^(size + 1) bytes
    return tf.where(flags >= 128, 3 * tf.bitwise.left_shift(tf.constant(2, tf.int64), flags % 8), 0)

  pos0 = 13 + table(_bytes(data, 10, 1)[0])

  def body(pos, in_blocks, total):
    b = _bytes(data, pos, 10)

    def block():  # pos at a block's introducer
      image = tf.equal(b[0], 0x2C)
      area = _le(b, 5, 2) * _le(b, 7, 2)
      next_image = pos + 10 + table(b[9]) + 1  # descriptor, local table, LZW minimum code size
      return (tf.where(image, next_image, pos + 2),  # an extension: introducer + label
              tf.constant(True), total + tf.where(image, area, 0))

    def sub_block():  # pos at a data sub-block's size byte; 0 ends the chain
      return pos + 1 + b[0], tf.not_equal(b[0], 0), total

    pos, in_blocks, total = tf.cond(in_blocks, sub_block, block)
    return pos, in_blocks, total

  def more(pos, in_blocks, total):
    del total
    at = _bytes(data, pos, 1)[0]
    return (pos < n) & (in_blocks | tf.equal(at, 0x2C) | tf.equal(at, 0x21))  # the trailer (or junk) ends it

  _, _, total = tf.while_loop(more, body, (pos0, tf.constant(False), tf.constant(0, tf.int64)))
  return total


def decoded_pixels(raw):
  """int64: the pixels the decoder allocates for an encoded image, from its headers, without decoding it: height x
  width of the header (image_size), except a GIF's largest of its logical screen and the sum of its frames' sizes
  (giflib reads every frame; a frame may be larger than the screen), and a 16-bit PNG's pixels twice (it decodes
  at 16 bits before the conversion to 8)."""
  height, width = image_size(raw)
  pixels = height * width
  is_png = tf.equal(tf.strings.substr(raw, 0, 4), b'\x89PNG')
  depth = tf.cond(is_png, lambda: _bytes(tf.strings.join([raw, tf.constant(b'\x00' * 32)]), 24, 1)[0],
                  lambda: tf.constant(8, tf.int64))
  pixels = tf.where(depth > 8, 2 * pixels, pixels)
  is_gif = tf.equal(tf.strings.substr(raw, 0, 3), b'GIF')
  return tf.cond(is_gif, lambda: tf.maximum(pixels, _gif_frames_pixels(raw)), lambda: pixels)


def decode_and_crop(raw, window_fn, max_pixels=None):
  """Decodes `raw` and crops window_fn(height, width) -> (y, x, h, w) out of it (uint8, 3 channels).

  `raw` is either encoded bytes (any format tf.io.decode_image reads; grayscale and CMYK JPEGs come out
  RGB) or an already decoded uint8 image. A JPEG only decodes the crop window (decode_and_crop_jpeg).
  max_pixels: an encoded image whose headers say it decodes to more than max_pixels pixels (decoded_pixels: every
  frame of a GIF, a 16-bit PNG twice) raises InvalidArgument before anything is decoded (no memory is spent on
  it).
  """
  if raw.dtype != tf.string:
    shape = tf.shape(raw)
    y, x, h, w = window_fn(shape[0], shape[1])
    return raw[y:y + h, x:x + w]

  if max_pixels is not None:
    check = tf.debugging.assert_less_equal(
        decoded_pixels(raw), tf.constant(max_pixels, tf.int64),
        message=f'image larger than data.max_image_pixels={max_pixels} (pixels from its headers: height x width, '
        'every GIF frame, 16-bit PNGs twice)')
    with tf.control_dependencies([check]):  # the decoders below only start once the check passed
      raw = tf.identity(raw)

  def jpeg():
    shape = tf.image.extract_jpeg_shape(raw)
    y, x, h, w = window_fn(shape[0], shape[1])
    # TF's default DCT is the fast, less exact one; PIL (torchvision) uses the accurate one.
    return tf.image.decode_and_crop_jpeg(raw, tf.stack([y, x, h, w]), channels=3,
                                         dct_method='INTEGER_ACCURATE')

  def other():  # PNG (also when named .jpg), GIF (first frame), BMP, WebP.
    image = tf.io.decode_image(raw, channels=3, expand_animations=False)
    shape = tf.shape(image)
    y, x, h, w = window_fn(shape[0], shape[1])
    return image[y:y + h, x:x + w]

  image = tf.cond(tf.io.is_jpeg(raw), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def full_window(height, width):
  return 0, 0, height, width


def rrc_window(height, width, *, scale, ratio, seed):
  """torchvision RandomResizedCrop.get_params: 10 tries, then a center crop clamped to the ratio range."""
  h_in, w_in = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  u = uniform([10, 4], seed)  # Per try: area, log-ratio, top, left.
  area = h_in * w_in * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[:, 1])
  w = tf.round(tf.sqrt(area * aspect))  # Round half to even, as Python's round().
  h = tf.round(tf.sqrt(area / aspect))
  ok = (w > 0) & (h > 0) & (w <= w_in) & (h <= h_in)
  top = tf.floor(u[:, 2] * (h_in - h + 1))  # randint(0, H - h) inclusive.
  left = tf.floor(u[:, 3] * (w_in - w + 1))
  first = tf.argmax(tf.cast(ok, tf.int32))  # The first successful try.

  # Fallback: the whole image, cut down to the nearest allowed aspect ratio, centered.
  in_ratio = w_in / h_in
  fw = tf.where(in_ratio < ratio[0], w_in, tf.where(in_ratio > ratio[1], tf.round(h_in * ratio[1]), w_in))
  fh = tf.where(in_ratio < ratio[0], tf.round(w_in / ratio[0]), h_in)
  fallback = tf.stack([tf.floor((h_in - fh) / 2), tf.floor((w_in - fw) / 2), fh, fw])
  chosen = tf.stack([top[first], left[first], h[first], w[first]])
  window = tf.cast(tf.where(tf.reduce_any(ok), chosen, fallback), tf.int32)
  return window[0], window[1], window[2], window[3]


def resize(image, size):
  """Bicubic resize to (size, size) with antialiasing (like PIL), rounded back to uint8 values."""
  image = tf.image.resize(image, [size, size], method='bicubic', antialias=True)
  return tf.round(tf.clip_by_value(image, 0.0, 255.0))


def flip(image, seed):
  """Horizontal flip with probability 1/2."""
  # tf.reverse: a strided slice image[:, ::-1] is several times slower.
  return tf.cond(uniform([], seed) < 0.5, lambda: tf.reverse(image, [1]), lambda: image)


def resize_shorter_center_crop(image, size, crop_pct):
  """Eval: resize the shorter side to round(size / crop_pct) (bicubic), then center crop size x size."""
  short = int(round(size / crop_pct))
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  # torchvision Resize(int): the longer side is truncated, not rounded.
  new_h = tf.where(h <= w, float(short), tf.floor(short * h / w))
  new_w = tf.where(h <= w, tf.floor(short * w / h), float(short))
  image = tf.image.resize(tf.cast(image, tf.float32), tf.cast(tf.stack([new_h, new_w]), tf.int32),
                          method='bicubic', antialias=True)
  image = tf.round(tf.clip_by_value(image, 0.0, 255.0))
  top = tf.cast(tf.round((new_h - size) / 2), tf.int32)  # torchvision CenterCrop.
  left = tf.cast(tf.round((new_w - size) / 2), tf.int32)
  image = image[top:top + size, left:left + size]
  image.set_shape([size, size, 3])
  return image


# ---------------------------------------------------------------------------------------------------------
# Colour.


_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert('L').


def grayscale(image):
  """Luma of an (H, W, 3) image, keeping a channel axis of 1."""
  return tf.reshape(tf.reshape(image, [-1, 3]) @ tf.constant(_LUMA, shape=[3, 1]), tf.shape(image[..., :1]))


def _per_channel(image, scale, offset):
  """image * scale + offset with (3,) constants, on an (H, W, 3) image of static shape."""
  h, w, _ = image.shape
  # Broadcasting a (3,) vector over the last axis does not vectorise; a (W * 3,) row does.
  rows = tf.reshape(image, [h, w * 3]) * tf.constant(list(scale) * w) + tf.constant(list(offset) * w)
  return tf.reshape(rows, [h, w, 3])


def blend(degenerate, image, factor):
  """PIL ImageEnhance / torchvision _blend: factor 0 -> degenerate, 1 -> image."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def color_jitter(image, strength, seed):
  """torchvision ColorJitter(brightness=contrast=saturation=strength, hue=0).

  Each factor is uniform in [max(0, 1 - strength), 1 + strength]; the three ops run in a random order.
  """
  if not strength:
    return image
  order_seed, factor_seed = split_seed(seed, 2)
  factors = uniform([3], factor_seed, max(0.0, 1.0 - strength), 1.0 + strength)
  order = tf.argsort(uniform([3], order_seed))
  luma = tf.constant(_LUMA)

  def saturation(x):  # blend(grayscale(x), x, f), as one 3x3 colour matrix.
    f = factors[2]
    matrix = f * tf.eye(3) + (1.0 - f) * luma[:, None]
    return tf.clip_by_value(tf.reshape(tf.reshape(x, [-1, 3]) @ matrix, tf.shape(x)), 0.0, 255.0)

  ops = [
      lambda x: tf.clip_by_value(x * factors[0], 0.0, 255.0),  # Brightness: blend with black.
      lambda x: blend(tf.tensordot(tf.reduce_mean(x, axis=[0, 1]), luma, 1), x, factors[1]),  # Contrast.
      saturation,
  ]
  for k in range(3):
    image = tf.switch_case(order[k], [lambda op=op: op(image) for op in ops])
  return image


def normalize(image, norm):
  """[0, 255] -> (x / 255 - mean) / std, per channel."""
  mean, std = norm
  return _per_channel(image, [1 / (255.0 * s) for s in std], [-m / s for m, s in zip(mean, std)])


def random_erasing(image, prob, seed):
  """timm RandomErasing(prob, mode='pixel', count 1) on a normalised image.

  With probability `prob`, one box of 2% - 1/3 of the area and aspect ratio in [0.3, 1/0.3] (10 tries)
  is filled with per-pixel, per-channel standard normal noise.
  """
  if not prob:
    return image
  apply_seed, box_seed, noise_seed = split_seed(seed, 3)
  height, width = image.shape[0], image.shape[1]
  u = uniform([10, 4], box_seed)
  area = height * width * (0.02 + (1 / 3 - 0.02) * u[:, 0])
  log_lo, log_hi = math.log(0.3), math.log(1 / 0.3)
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[:, 1])
  h = tf.round(tf.sqrt(area * aspect))
  w = tf.round(tf.sqrt(area / aspect))
  ok = (w < width) & (h < height)
  first = tf.argmax(tf.cast(ok, tf.int32))
  top = tf.floor(u[first, 2] * (height - h[first] + 1))
  left = tf.floor(u[first, 3] * (width - w[first] + 1))
  rows = tf.range(height, dtype=tf.float32)[:, None, None]
  cols = tf.range(width, dtype=tf.float32)[None, :, None]
  box = (rows >= top) & (rows < top + h[first]) & (cols >= left) & (cols < left + w[first])
  erase = tf.reduce_any(ok) & (uniform([], apply_seed) < prob)
  noise = lambda: tf.random.stateless_normal(tf.shape(image), noise_seed, alg=_ALG)
  return tf.cond(erase, lambda: tf.where(box, noise(), image), lambda: image)
