"""python -m tinymim_jax.convert: see tinymim_jax/convert/cli.py."""

import sys

from tinymim_jax.convert.cli import main

sys.exit(main())
