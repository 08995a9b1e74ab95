"""TensorFlow and TFDS, imported on first use.

The rest of the project never imports TensorFlow; `import tinymim_jax.data` must not either, so the data
modules reach TF through these proxies, which import the real module the first time an attribute is read.
"""
import importlib
import types


def _setup_tensorflow(tf):
  # TF only feeds the host; it must not grab accelerators that JAX owns.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # Already initialised by someone else: leave it.
    pass


class _LazyModule(types.ModuleType):
  """Stands for a module and imports it when one of its attributes is first read."""

  def __init__(self, name, setup=None):
    super().__init__(name)
    self._setup = setup
    self._module = None

  def __getattr__(self, attr):
    if attr.startswith('__'):  # copy/pickle/inspect probes must not import TF.
      raise AttributeError(attr)
    if self._module is None:
      module = importlib.import_module(self.__name__)
      if self._setup is not None:
        self._setup(module)
      self._module = module
    return getattr(self._module, attr)


tf = _LazyModule('tensorflow', setup=_setup_tensorflow)
# Reading `tf.config` first makes sure TF is set up before TFDS starts using it.
tfds = _LazyModule('tensorflow_datasets', setup=lambda _: tf.config)
