from s3cachefs.cli.main import main

raise SystemExit(main())
