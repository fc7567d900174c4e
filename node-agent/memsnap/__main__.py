import sys

from memsnap.cli import main

sys.exit(main())
