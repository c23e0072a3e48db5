"""`python -m uptrain`: the same as the `uptrain` command."""

from uptrain.cli import main

raise SystemExit(main())
