"""`make gpu-check`: the plan of a borrowed GPU machine's one call (plan.py), its runner (run.py) and the
report it commits (report.py)."""
