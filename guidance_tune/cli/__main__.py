import sys

from guidance_tune.cli.main import main

sys.exit(main())
