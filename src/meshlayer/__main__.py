from meshlayer.cli.main import main

raise SystemExit(main())
