"""What a person reads: run records (and `gc` of what no kept run uses), the run report (HTML +
charts, one line per stage from the registry), progress bars, pass@k metrics."""
