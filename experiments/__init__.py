"""Command line, configs, shape sets, benchmarks and reports: ``python -m experiments --help``."""
