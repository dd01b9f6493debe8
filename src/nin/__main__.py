import sys

from nin.cli import main

sys.exit(main())
