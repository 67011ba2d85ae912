from tsqp.cli import main

raise SystemExit(main())
