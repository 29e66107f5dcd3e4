import sys

from flip_ds.cli import main

sys.exit(main())
