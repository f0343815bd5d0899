"""Device simulators for exercising the gateway against real protocol servers."""
