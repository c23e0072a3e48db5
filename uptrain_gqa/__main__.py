"""`python -m uptrain_gqa`: the same as the `uptrain` command."""

from uptrain_gqa.cli import main

raise SystemExit(main())
