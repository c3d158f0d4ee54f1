import sys

from dspex_trio._cli import main

sys.exit(main())
