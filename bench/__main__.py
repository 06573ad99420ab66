"""``python -m bench [--quick | --smoke] [--scenarios a,b] [--repeats N] [--out DIR] [--profile]``."""

from bench.runner import main

raise SystemExit(main())
