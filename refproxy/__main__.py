from refproxy.cli import main

raise SystemExit(main())
