"""Step latency: profiles against tree size (profile.py), the latency regression test per device
(regression.py, cli.py), the bandwidth floor (floor.py) and where a CPU step goes (breakdown.py)."""
