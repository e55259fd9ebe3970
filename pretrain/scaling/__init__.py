"""Scaling laws: sweeps of small runs (plan, runner), fitted laws (fit), predictions (predict),
loss-curve fits of single runs (curve) and plots (plots)."""
