"""`python -m benchmarks [--scale smoke|small|full] ...` runs the fleet suite (benchmarks.suite)."""

import sys

from .suite import main

sys.exit(main())
