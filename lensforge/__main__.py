import sys

from lensforge.cli.main import main

sys.exit(main())
