import sys

from zmzoo.cli import main

sys.exit(main())
