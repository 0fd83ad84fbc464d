"""The step engine: batch shapes, trials that run a workload and measure it, ranks that agree."""
