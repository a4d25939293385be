"""`python -m scepsy_hpc.gateway --endpoints FILE [--trace out.jsonl] [--host H] [--port P] [--time-scale S]`."""

from scepsy_hpc.gateway.server import main

raise SystemExit(main())
