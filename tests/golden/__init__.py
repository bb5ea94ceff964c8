"""Golden trajectories of the optimizer (configurations, recorder and recorded data); see record.py."""
