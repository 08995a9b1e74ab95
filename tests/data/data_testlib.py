"""Helpers for the data tests: small generated datasets, all offline."""
import io
import os
import tarfile

import numpy as np
from PIL import Image

# First lines of TFDS's bundled validation_labels.txt: the labels of ILSVRC2012_val_00000001.JPEG, ...
VAL_SYNSETS = ('n01751748', 'n09193705', 'n02105855', 'n04263257', 'n03125729', 'n01735189')
TRAIN_SYNSETS = ('n01735189', 'n01751748', 'n02105855')
# Their indices in TFDS's labels.txt (sorted synsets), i.e. the labels the pipeline must produce.
SYNSET_INDEX = {'n01735189': 57, 'n01751748': 65, 'n02105855': 230, 'n03125729': 516, 'n04263257': 809,
                'n09193705': 970}


def color_of(label):
  """A distinct solid colour per class, so a label can be checked against the pixels."""
  rng = np.random.default_rng(label)
  return tuple(int(v) for v in rng.integers(20, 236, size=3))


def encode(array, fmt='JPEG'):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
  return buffer.getvalue()


def solid(label, height=36, width=48):
  return np.broadcast_to(np.array(color_of(label), np.uint8), (height, width, 3)).copy()


def _add(tar, name, payload):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def make_imagenet_tars(manual_dir, per_class=4):
  """The two official archives, in their layout, with tiny solid-colour JPEGs."""
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'), 'w') as outer:
    for synset in TRAIN_SYNSETS:
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode='w') as inner:
        for k in range(per_class):
          _add(inner, f'{synset}_{k + 1}.JPEG', encode(solid(SYNSET_INDEX[synset], 30 + 2 * k, 40)))
      _add(outer, f'{synset}.tar', inner_bytes.getvalue())
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'), 'w') as val:
    for k, synset in enumerate(VAL_SYNSETS):
      _add(val, f'ILSVRC2012_val_{k + 1:08d}.JPEG', encode(solid(SYNSET_INDEX[synset], 40, 30 + 2 * k)))


def write_files(root, files):
  """files: {relative path: bytes}."""
  for path, payload in files.items():
    full = os.path.join(root, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, 'wb') as f:
      f.write(payload)


def folder_cfg(root, image_size=16, **overrides):
  from tinymim_jax import data
  cfg = data.default_config()
  cfg.name = 'folder'
  cfg.folder = str(root)
  cfg.image_size = image_size
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


def timm_module(name):
  """timm.data.<name> loaded from its file without importing the timm package.

  Importing timm (torchvision, triton) after TensorFlow segfaults with TF 2.21 + torch 2.14; the two
  modules used here need only PIL / numpy / torch. Skips the test when timm is not installed.
  """
  import importlib.util
  import sys
  import pytest
  spec = importlib.util.find_spec('timm')
  if spec is None:
    pytest.skip('timm is not installed')
  key = f'_timm_standalone_{name}'
  if key not in sys.modules:
    path = os.path.join(spec.submodule_search_locations[0], 'data', f'{name}.py')
    module_spec = importlib.util.spec_from_file_location(key, path)
    sys.modules[key] = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(sys.modules[key])
  return sys.modules[key]


def black_png(width, height, rows_per_block=256):
  """A valid all-black RGB PNG of width x height, built without ever holding the image: 16000 x 16000 is ~0.7 MB
  and takes well under a second. The zlib stream repeats one deflate block (a full flush resets the compressor,
  so every block of the same rows compresses to the same bytes); the pixels are all zero bytes, so their
  Adler-32 is (n mod 65521) << 16 | 1."""
  import struct
  import zlib

  def chunk(kind, payload):
    return struct.pack('>I', len(payload)) + kind + payload + struct.pack('>I', zlib.crc32(kind + payload))

  row = bytes(1 + 3 * width)  # Filter type 0, then black pixels.
  full, rest = divmod(height, rows_per_block)
  block = zlib.compressobj(9, zlib.DEFLATED, -15)
  block = block.compress(row * rows_per_block) + block.flush(zlib.Z_FULL_FLUSH)
  last = zlib.compressobj(9, zlib.DEFLATED, -15)
  last = last.compress(row * rest) + last.flush(zlib.Z_FINISH)  # Ends with the final block.
  adler = (len(row) * height % 65521) << 16 | 1
  stream = b'\x78\x9c' + block * full + last + struct.pack('>I', adler)
  header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', stream) + chunk(b'IEND', b'')
