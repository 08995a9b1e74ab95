"""Per-example ops against torchvision / PIL / timm semantics."""
import io
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest
from sklearn.datasets import load_sample_image

from tinymim_jax.data import randaug
from tinymim_jax.data import transforms
from tinymim_jax.data._tf import tf

import data_testlib


def _photo(size=64):
  """A real photo crop (scikit-learn's china.jpg), uint8."""
  return load_sample_image('china.jpg')[100:100 + size, 200:200 + size]


def _torchvision_rrc(height, width, u, scale, ratio):
  """torchvision RandomResizedCrop.get_params, fed with our uniforms instead of torch's RNG."""
  area = height * width
  for a, r, t, l in u:
    target_area = area * (scale[0] + (scale[1] - scale[0]) * a)
    aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * r)
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(t * (height - h + 1)), int(l * (width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize('shape,scale', [((375, 500), (0.08, 1.0)), ((40, 30), (0.2, 1.0)),
                                         ((3, 400), (0.5, 1.0)), ((400, 3), (0.9, 1.0))])
def test_rrc_window_is_torchvisions(shape, scale):
  ratio = (3 / 4, 4 / 3)
  for s in range(20):
    seed = tf.constant([s, 7], tf.int64)
    got = [int(v) for v in transforms.rrc_window(*shape, scale=scale, ratio=ratio, seed=seed)]
    u = transforms.uniform([10, 4], seed).numpy().astype(np.float64)
    assert got == list(_torchvision_rrc(*shape, u, scale, ratio))
    y, x, h, w = got
    assert 0 <= y and y + h <= shape[0] and 0 <= x and x + w <= shape[1]


def test_decode_formats():
  rgb = _photo(32)
  gray = rgb.mean(-1).astype(np.uint8)
  cases = {'png': (rgb, 'PNG'), 'gray': (gray, 'JPEG'), 'cmyk': (rgb, 'CMYK')}
  for name, (array, fmt) in cases.items():
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert('CMYK') if fmt == 'CMYK' else image).save(buffer, 'PNG' if fmt == 'PNG' else 'JPEG',
                                                             quality=95)
    want = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert('RGB'), np.int32)
    got = transforms.decode_and_crop(tf.constant(buffer.getvalue()), transforms.full_window).numpy()
    assert got.shape == (32, 32, 3), name
    diff = np.abs(got.astype(np.int32) - want)  # JPEG decoders differ slightly (IDCT, upsampling).
    assert diff.mean() < 1.0 and diff.max() <= 8, name


def test_decode_and_crop_jpeg_crops_the_window():
  buffer = io.BytesIO()
  Image.fromarray(_photo(48)).save(buffer, 'JPEG', quality=95)
  raw = tf.constant(buffer.getvalue())
  full = transforms.decode_and_crop(raw, transforms.full_window).numpy()
  crop = transforms.decode_and_crop(raw, lambda h, w: (5, 7, 20, 30)).numpy()
  np.testing.assert_array_equal(crop, full[5:25, 7:37])


def test_eval_transform_matches_torchvision_pil():
  photo = load_sample_image('flower.jpg')  # 427 x 640
  got = transforms.resize_shorter_center_crop(tf.constant(photo), 32, 0.875).numpy()
  # torchvision Resize(37) (bicubic; the long side int(37 * 640 / 427) = 55) + CenterCrop(32) on PIL.
  pil = Image.fromarray(photo).resize((55, 37), Image.BICUBIC)
  want = np.asarray(pil, np.float32)[2:34, 12:44]
  assert got.shape == (32, 32, 3)
  assert np.abs(got - want).mean() < 2.0


def test_color_jitter_and_erasing_limits():
  image = tf.constant(_photo(16), tf.float32)
  seed = tf.constant([1, 2], tf.int64)
  assert transforms.color_jitter(image, 0.0, seed) is image
  jittered = transforms.color_jitter(image, 0.4, seed).numpy()
  assert 0 <= jittered.min() and jittered.max() <= 255 and not np.allclose(jittered, image)
  np.testing.assert_array_equal(transforms.random_erasing(image, 0.0, seed), image)
  erased = [transforms.random_erasing(image, 1.0, tf.constant([s, 3], tf.int64)).numpy() for s in range(5)]
  for e in erased:  # A box of 2% - 33% of the area is replaced by noise.
    changed = (e != image.numpy()).any(-1).mean()
    assert 0.015 < changed <= 0.34


def _pil_affine(image, data, fill):
  return np.asarray(Image.fromarray(image).transform(image.shape[1::-1], Image.AFFINE, data,
                                                     resample=Image.BILINEAR, fillcolor=fill), np.float32)


def _sharpness_ref(image, f):
  return np.asarray(ImageEnhance.Sharpness(Image.fromarray(image)).enhance(f), np.float32)


@pytest.mark.parametrize('name,level,sign,reference,tolerance', [
    ('AutoContrast', 0.9, 1, lambda x: ImageOps.autocontrast(x), 1),
    ('Equalize', 0.9, 1, lambda x: ImageOps.equalize(x), 1),
    ('Invert', 0.9, 1, lambda x: ImageOps.invert(x), 0),
    ('PosterizeIncreasing', 0.9, 1, lambda x: ImageOps.posterize(x, 1), 0),
    ('Posterize', 0.6, 1, lambda x: ImageOps.posterize(x, 2), 0),
    ('SolarizeIncreasing', 0.9, 1, lambda x: ImageOps.solarize(x, 26), 0),
    ('SolarizeAdd', 0.9, 1, lambda x: x.point([min(255, i + 99) if i < 128 else i for i in range(256)] * 3), 0),
    ('ColorIncreasing', 0.9, -1, lambda x: ImageEnhance.Color(x).enhance(0.19), 1),
    ('ContrastIncreasing', 0.9, 1, lambda x: ImageEnhance.Contrast(x).enhance(1.81), 1),
    ('BrightnessIncreasing', 0.9, -1, lambda x: ImageEnhance.Brightness(x).enhance(0.19), 1),
    ('Sharpness', 0.5, 1, lambda x: ImageEnhance.Sharpness(x).enhance(1.0), 1),
    ('SharpnessIncreasing', 0.9, -1, lambda x: ImageEnhance.Sharpness(x).enhance(0.19), 1),
])
def test_randaug_pixel_ops_match_pil(name, level, sign, reference, tolerance):
  image = _photo(40)
  got = randaug._OPS[name](tf.constant(image, tf.float32), tf.constant(level), tf.constant(float(sign)),
                           (124, 116, 104))
  want = np.asarray(reference(Image.fromarray(image)), np.float32)
  assert np.abs(tf.round(got).numpy() - want).max() <= tolerance


@pytest.mark.parametrize('name,level,sign,data', [
    ('ShearX', 0.9, 1, (1, 0.27, 0, 0, 1, 0)),
    ('ShearY', 0.9, -1, (1, 0, 0, -0.27, 1, 0)),
    ('TranslateXRel', 0.9, 1, (1, 0, 0.405 * 40, 0, 1, 0)),
    ('TranslateYRel', 0.5, -1, (1, 0, 0, 0, 1, -0.225 * 40)),
])
def test_randaug_geometric_ops_match_pil_bilinear(name, level, sign, data):
  image = _photo(40)
  fill = (124, 116, 104)
  got = randaug._OPS[name](tf.constant(image, tf.float32), tf.constant(level), tf.constant(float(sign)), fill)
  want = _pil_affine(image, data, fill)
  assert np.abs(got.numpy() - want).mean() < 1.5


def test_randaug_rotate_matches_pil():
  image = _photo(40)
  got = randaug._OPS['Rotate'](tf.constant(image, tf.float32), tf.constant(0.5), tf.constant(1.0),
                               (124, 116, 104)).numpy()
  want = np.asarray(Image.fromarray(image).rotate(15.0, resample=Image.BILINEAR, fillcolor=(124, 116, 104)),
                    np.float32)
  assert np.abs(got - want).mean() < 1.5


def test_randaugment_parse_and_run():
  assert randaug.parse('rand-m9-mstd0.5-inc1') == dict(num_layers=2, magnitude=9.0, magnitude_std=0.5, prob=0.5,
                                                       ops=randaug._INCREASING)
  assert randaug.parse('rand-m7-n3')['num_layers'] == 3
  with pytest.raises(ValueError, match='randaug'):
    randaug.parse('rand-m9-w0')
  with pytest.raises(ValueError, match='randaug'):
    randaug.parse('autoaug-m9')
  image = tf.constant(_photo(24), tf.float32)
  outs = [randaug.randaugment(image, 'rand-m9-mstd0.5-inc1', tf.constant([s, 0], tf.int64), (124, 116, 104))
          for s in range(8)]
  assert all(o.shape == (24, 24, 3) for o in outs)
  assert sum(not np.array_equal(o, image) for o in outs) >= 4  # Each op applies with p = 0.5, two layers.


_TIMM_OPS = sorted(set(randaug._INCREASING) | set(randaug._ORIGINAL))
_GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


@pytest.mark.parametrize('name', _TIMM_OPS)
def test_randaug_ops_match_timm(name, monkeypatch):
  """Each op at magnitude 9, both signs, against timm's own op and level map (bilinear resampling)."""
  aa = data_testlib.timm_module('auto_augment')
  image = _photo(40)
  fill = (124, 116, 104)
  for sign, draw in ((1.0, 0.0), (-1.0, 0.9)):  # timm negates when random() > 0.5.
    monkeypatch.setattr(aa.random, 'random', lambda: draw)
    level_fn = aa.LEVEL_TO_ARG[name]
    args = level_fn(9.0, {'translate_pct': 0.45}) if level_fn else ()
    want = np.asarray(aa.NAME_TO_OP[name](Image.fromarray(image), *args, fillcolor=fill,
                                          resample=Image.BILINEAR), np.float32)
    monkeypatch.undo()
    got = tf.round(randaug._OPS[name](tf.constant(image, tf.float32), tf.constant(0.9), tf.constant(sign),
                                      fill)).numpy()
    diff = np.abs(got - want)
    if name in _GEOMETRIC:
      assert diff.mean() < 1.5, (name, sign)
    else:
      assert diff.max() <= 1, (name, sign)


@pytest.mark.parametrize('fmt,size', [('PNG', (53, 37)), ('JPEG', (53, 37)), ('GIF', (20, 300)), ('BMP', (53, 37)),
                                      ('WEBP', (53, 37))])
def test_image_size_from_the_header(fmt, size):
  image = np.zeros(size + (3,), np.uint8)
  assert [int(v) for v in transforms.image_size(tf.constant(data_testlib.encode(image, fmt)))] == list(size)


def test_webp_header_layouts():
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((21, 40, 3), np.uint8)).save(buffer, 'WEBP', lossless=True)  # VP8L
  assert [int(v) for v in transforms.image_size(tf.constant(buffer.getvalue()))] == [21, 40]
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((21, 40, 4), np.uint8)).save(buffer, 'WEBP')  # alpha: VP8X
  assert [int(v) for v in transforms.image_size(tf.constant(buffer.getvalue()))] == [21, 40]


def test_an_image_above_the_pixel_limit_is_refused_before_decoding():
  raw = tf.constant(data_testlib.black_png(16000, 16000))  # ~0.7 MB; decoded it would be 768 MB
  assert [int(v) for v in transforms.image_size(raw)] == [16000, 16000]
  with pytest.raises(tf.errors.InvalidArgumentError, match='larger than data.max_image_pixels=89478485'):
    transforms.decode_and_crop(raw, transforms.full_window, 89_478_485)
  small = tf.constant(data_testlib.black_png(30, 20))
  assert transforms.decode_and_crop(small, transforms.full_window, 600).shape == (20, 30, 3)
  with pytest.raises(tf.errors.InvalidArgumentError):
    transforms.decode_and_crop(small, transforms.full_window, 599)


def _gif_with_a_frame_larger_than_its_screen(screen=(16, 16), frame=(12000, 12000)):
  """A GIF89a whose logical screen is `screen` (w, h) and whose one frame is `frame`: what the header says is not
  what giflib allocates (a raster of every frame's size)."""
  import struct
  head = b'GIF89a' + struct.pack('<HH', *screen) + bytes([0x80, 0, 0]) + b'\x00\x00\x00\xff\xff\xff'
  comment = b'\x21\xfe' + b'\x03abc' + b'\x00'  # an extension block on the way
  image = b'\x2c' + struct.pack('<HHHH', 0, 0, *frame) + b'\x00' + b'\x02' + b'\x02\x4c\x01' + b'\x00'
  return head + comment + image + b'\x3b'


def test_the_pixel_limit_counts_every_gif_frame_and_16_bit_depth():
  raw = tf.constant(_gif_with_a_frame_larger_than_its_screen())
  assert [int(v) for v in transforms.image_size(raw)] == [16, 16]  # the logical screen
  assert int(transforms.decoded_pixels(raw)) == 12000 * 12000
  with pytest.raises(tf.errors.InvalidArgumentError, match='larger than data.max_image_pixels=89478485'):
    transforms.decode_and_crop(raw, transforms.full_window, 89_478_485)
  # An ordinary animated GIF: the sum of its frames (PIL writes each frame's changed box only).
  frames = [Image.fromarray(np.full((20, 30, 3), 40 * k, np.uint8)) for k in range(3)]
  buffer = io.BytesIO()
  frames[0].save(buffer, 'GIF', save_all=True, append_images=frames[1:], comment=b'x' * 600)
  gif = tf.constant(buffer.getvalue())
  assert int(transforms.decoded_pixels(gif)) == 3 * 600
  assert transforms.decode_and_crop(gif, transforms.full_window, 1800).shape == (20, 30, 3)
  with pytest.raises(tf.errors.InvalidArgumentError):
    transforms.decode_and_crop(gif, transforms.full_window, 1799)
  # A 16-bit PNG decodes at 16 bits: its pixels count twice.
  buffer = io.BytesIO()
  Image.fromarray(np.full((20, 30), 1000, np.uint16)).save(buffer, 'PNG')
  png16 = tf.constant(buffer.getvalue())
  assert int(transforms.decoded_pixels(png16)) == 2 * 600
  assert transforms.decode_and_crop(png16, transforms.full_window, 1200).shape == (20, 30, 3)
  with pytest.raises(tf.errors.InvalidArgumentError):
    transforms.decode_and_crop(png16, transforms.full_window, 1199)
