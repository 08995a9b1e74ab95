"""Fixtures for the data tests: small generated datasets, all offline."""
import pytest

import data_testlib


@pytest.fixture(scope='session')
def imagenet_cfg(tmp_path_factory):
  """A fake imagenet2012, prepared by TFDS from tars in manual_dir (nothing downloaded)."""
  from tinymim_jax import data
  root = tmp_path_factory.mktemp('imagenet')
  data_testlib.make_imagenet_tars(str(root / 'manual'))
  cfg = data.default_config()
  cfg.name = 'imagenet2012'
  cfg.data_dir = str(root / 'tfds')
  cfg.manual_dir = str(root / 'manual')
  cfg.image_size = 16
  cfg.shuffle_buffer = 5
  data.dataset_info(cfg)  # Prepares it.
  return cfg
