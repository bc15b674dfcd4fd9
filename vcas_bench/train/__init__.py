"""Training: small builders, the one loop, and ``run(cfg)`` that drives a comparison."""
