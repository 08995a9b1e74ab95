"""Input pipeline throughput: distillation views (both, 224 px) from JPEG files, tf.data vs torchvision.

  python benchmarks/data_pipeline.py [--images 2048] [--batch 64] [--no-append]

Writes 256 JPEGs (~500x375, re-encoded crops of scikit-learn's two sample photos) to a temp folder, then
measures decoded-and-augmented images/s for
  * our tf.data pipeline (data.make_train_iterator(mode='distill') on an image folder),
  * the same with a plain map instead of the per-example error handling (its cost),
  * torchvision/PIL in a torch DataLoader (num_workers = cores), the same augmentations:
    RandomResizedCrop(224, (0.2, 1), bicubic) + flip shared, teacher normalize, student ColorJitter(0.4,
    0.4, 0.4) + normalize.
Each runs in its own process (TF and torchvision do not share a process well), after a warm-up. Prints one
table and appends it to BENCHMARKS.md under "## Data pipeline".
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = '## Data pipeline'


def write_jpegs(root, count=256):
  """count JPEGs of about 500x375 (both orientations), crops of the two sample photos, 2 classes."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_sample_image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  for name in ('china', 'flower'):
    photo = Image.fromarray(load_sample_image(f'{name}.jpg'))  # 640 x 427
    os.makedirs(os.path.join(root, 'train', name), exist_ok=True)
    for k in range(count // 2):
      w, h = int(rng.integers(380, 640)), int(rng.integers(280, 427))
      x, y = int(rng.integers(0, 640 - w + 1)), int(rng.integers(0, 427 - h + 1))
      size = (500, 375) if k % 4 else (375, 500)
      crop = photo.crop((x, y, x + w, y + h)).resize(size, Image.BICUBIC)
      crop.save(os.path.join(root, 'train', name, f'{k:04d}.jpg'), quality=int(rng.integers(80, 96)))


def _cpu_seconds(process):
  """CPU time of a process and its live children."""
  total = sum(process.cpu_times()[:2])
  for child in process.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except Exception:  # pylint: disable=broad-except  (a child that just exited)
      pass
  return total


def _measure(batches, images, batch_size):
  """(images/s, images per CPU-second) over `images` images after a warm-up of two epochs' worth."""
  import psutil  # pylint: disable=g-import-not-at-top
  me = psutil.Process()
  for _ in range(max(1, 512 // batch_size)):
    next(batches)
  cpu0, t0 = _cpu_seconds(me), time.perf_counter()
  for _ in range(images // batch_size):
    next(batches)
  wall, cpu = time.perf_counter() - t0, _cpu_seconds(me) - cpu0
  return images / wall, images / cpu


def run_tf(folder, images, batch_size, plain):
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.path.insert(0, REPO)
  from tinymim_jax import data  # pylint: disable=g-import-not-at-top
  from tinymim_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  if plain:  # Same ops, without the per-example try (one-element dataset + fallback).
    pipeline._try_map = lambda ds, fn, fallback, n: ds.map(  # pylint: disable=protected-access
        lambda e: dict(fn(e), valid=True), num_parallel_calls=n, deterministic=True)
  cfg = data.default_config()
  cfg.name, cfg.folder, cfg.image_size = 'folder', folder, 224
  it = data.make_train_iterator(cfg, mode='distill', global_batch_size=batch_size, seed=0, process_index=0,
                                process_count=1)
  return _measure(it, images, batch_size)


def run_torch(folder, images, batch_size):
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils import data as torch_data  # pylint: disable=g-import-not-at-top
  from torchvision import datasets, transforms as T  # pylint: disable=g-import-not-at-top

  normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
  crop = T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip()])
  jitter = T.ColorJitter(0.4, 0.4, 0.4)

  def views(image):
    image = crop(image)
    return normalize(image), normalize(jitter(image))

  dataset = datasets.ImageFolder(os.path.join(folder, 'train'), transform=views)
  loader = torch_data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=os.cpu_count(),
                                 drop_last=True, persistent_workers=True)

  def forever():
    while True:
      yield from loader

  torch.set_num_threads(1)
  return _measure(forever(), images, batch_size)


def _append(entry):
  path = os.path.join(REPO, 'BENCHMARKS.md')
  text = open(path).read() if os.path.exists(path) else '# Benchmarks\n'
  if SECTION not in text:
    text = text.rstrip('\n') + f'\n\n{SECTION}\n'
  start = text.index(SECTION)
  nxt = text.find('\n## ', start + len(SECTION))  # Our section ends where the next one starts.
  end = len(text) if nxt < 0 else nxt + 1
  text = text[:end].rstrip('\n') + '\n\n' + entry + '\n' + ('\n' + text[end:] if end < len(text) else '')
  with open(path, 'w') as f:
    f.write(text)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=2048, help='images timed per pipeline (after warm-up)')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--no-append', action='store_true', help='print only; leave BENCHMARKS.md alone')
  parser.add_argument('--run', choices=('tf', 'tf_plain', 'torch'), help=argparse.SUPPRESS)
  parser.add_argument('--folder', help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.run:  # A child: one measurement, printed as JSON.
    if args.run == 'torch':
      result = run_torch(args.folder, args.images, args.batch)
    else:
      result = run_tf(args.folder, args.images, args.batch, plain=args.run == 'tf_plain')
    print(json.dumps(result))
    return

  cores = os.cpu_count()
  rows = []
  with tempfile.TemporaryDirectory() as folder:
    write_jpegs(folder)
    for run, label in (('tf', 'tf.data (ours: data.make_train_iterator, mode=distill)'),
                       ('tf_plain', 'tf.data, same ops, plain map (no per-example error handling)'),
                       ('torch', f'torchvision + PIL, DataLoader(num_workers={cores})')):
      load = os.getloadavg()[0]
      out = subprocess.run([sys.executable, __file__, '--run', run, '--folder', folder, '--images',
                            str(args.images), '--batch', str(args.batch)], capture_output=True, text=True)
      if out.returncode:
        sys.exit(f'{run} failed:\n{out.stderr[-3000:]}')
      per_s, per_cpu_s = json.loads(out.stdout.strip().splitlines()[-1])
      rows.append((label, per_s, per_s / cores, per_cpu_s, load))
      print(f'{label}: {per_s:.1f} images/s', flush=True)

  sys.path.insert(0, REPO)
  from tinymim_jax import environment  # pylint: disable=g-import-not-at-top
  versions = environment.versions(('tensorflow', 'tensorflow_datasets', 'torch', 'torchvision', 'pillow', 'numpy'))
  table = ['| pipeline (2 views, 224 px, from JPEG) | images/s | images/s/core | images/CPU-s '
           '| load avg before |', '|---|---:|---:|---:|---:|']
  table += [f'| {l} | {a:.1f} | {b:.1f} | {c:.1f} | {d:.2f} |' for l, a, b, c, d in rows]
  entry = '\n'.join([
      f'### {datetime.date.today().isoformat()}: distillation views, tf.data vs torchvision',
      '',
      f'Command: `python benchmarks/data_pipeline.py --images {args.images} --batch {args.batch}`. '
      f'Machine: {cores} cores (nproc), {environment.cpu_model()}, {platform.system()} {platform.release()}. '
      'Versions: ' + ', '.join(f'{k} {v}' for k, v in versions.items()) + '.',
      f'256 JPEGs of 500x375 / 375x500 (re-encoded crops of scikit-learn\'s china.jpg and flower.jpg), '
      f'batch {args.batch}, {args.images} images timed after a warm-up. images/s/core = images/s / nproc; '
      'images/CPU-s divides by the CPU time the pipeline\'s processes actually used (robust to other load '
      'on the machine).',
      '',
      *table,
  ])
  print('\n' + '\n'.join(table))
  if not args.no_append:
    print(f'appended to {_append(entry)}')


if __name__ == '__main__':
  main()
