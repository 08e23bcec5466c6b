from digi2real.cli import main

raise SystemExit(main())
