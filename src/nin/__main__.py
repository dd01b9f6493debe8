import sys

from nin.cli.main import main

sys.exit(main())
