"""What a command does end to end: run a sweep (prepare, run, summarise, exit code), train one trial, estimate
a sweep's cost."""
