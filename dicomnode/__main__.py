from dicomnode.ops.cli import main

raise SystemExit(main())
