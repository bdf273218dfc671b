import sys

from sketchwalk.cli import main

sys.exit(main())
