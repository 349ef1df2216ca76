import sys

from qguard.cli import main

sys.exit(main())
