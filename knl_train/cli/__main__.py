import sys

from knl_train.cli import main

sys.exit(main())
