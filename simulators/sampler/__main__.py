"""``python -m simulators.sampler``: same as ``gateway simulate sampler``."""

from simulators.sampler import main

raise SystemExit(main())
