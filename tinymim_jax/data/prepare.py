r"""Prepares TFDS imagenet2012 from the two official tars, once, before training (never downloads).

  python -m tinymim_jax.data.prepare --data_dir=/data/tfds --manual_dir=/data/imagenet
  # manual_dir holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar; takes hours, ~150 GB written.

Training prepares on first use too, but in a multi-process job every process would try at once: run this
first, then point data.data_dir at the same directory.
"""
import argparse

from tinymim_jax.data import config, sources


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default=None, help='TFDS data dir (default: TFDS default)')
  parser.add_argument('--manual_dir', required=True, help='directory holding the two ILSVRC2012 tars')
  args = parser.parse_args(argv)
  c = config.resolve({'name': 'imagenet2012', 'data_dir': args.data_dir, 'manual_dir': args.manual_dir})
  builder = sources.imagenet_builder(c)
  print(f'imagenet2012 is prepared in {builder.data_dir}: '
        + ', '.join(f'{k} {v.num_examples}' for k, v in builder.info.splits.items()))


if __name__ == '__main__':
  main()
