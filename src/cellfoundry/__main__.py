from cellfoundry.cli import main

raise SystemExit(main())
