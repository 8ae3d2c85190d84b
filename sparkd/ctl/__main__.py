import sys

from .sparkctl import main

sys.exit(main())
