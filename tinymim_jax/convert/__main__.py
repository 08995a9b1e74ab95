"""python -m tinymim_jax.convert: the converter's command line (an entry point; it lives in
tinymim_jax/convert_cli.py, outside the library package)."""

import sys

from tinymim_jax.convert_cli import main

sys.exit(main())
