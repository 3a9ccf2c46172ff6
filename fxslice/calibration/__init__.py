"""Calibration as a service: run a program over token windows stage by stage and let observers
accumulate statistics at values of the graph (see `fxslice.calibration.runner` and `.observers`)."""
