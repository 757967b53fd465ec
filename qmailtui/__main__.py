import sys

from qmailtui.cli import main

sys.exit(main())
