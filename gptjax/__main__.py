import sys

from gptjax.cli import main

sys.exit(main())
