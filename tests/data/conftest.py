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


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Any attempt to open an internet socket fails the test (local pipes and Unix sockets still work)."""
  import socket

  real_connect = socket.socket.connect

  def connect(sock, address, *args):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
      raise AssertionError(f'a data test tried to reach the network: {address}')
    return real_connect(sock, address, *args)

  monkeypatch.setattr(socket.socket, 'connect', connect)
  monkeypatch.setattr(socket.socket, 'connect_ex', connect)
