"""The data package must not import TensorFlow until a pipeline is built."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CODE = """
import sys
def tf_modules():
  return sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets'))
import tinymim_jax.data as data
import jax, jax.numpy as jnp
cfg = data.default_config()
cfg.image_size = 8
data.mixup_cutmix(jax.random.key(0), jnp.zeros((2, 4, 4, 3)), jnp.zeros(2, jnp.int32), num_classes=3)
print(tf_modules())
next(data.make_eval_iterator(cfg, global_batch_size=8, process_index=0, process_count=1))
print('tensorflow' in tf_modules())
"""


def test_import_does_not_import_tensorflow():
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, '-c', _CODE], env=env, capture_output=True, text=True, check=True,
                       timeout=120).stdout.split('\n')
  assert out[0] == '[]'  # Importing the package, configs and the JAX helpers: no TF.
  assert out[1] == 'True'  # Building a pipeline brings it in.
