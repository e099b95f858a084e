import sys

from pgtraj.app.cli import main

sys.exit(main())
