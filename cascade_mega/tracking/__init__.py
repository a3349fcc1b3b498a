"""Experiment tracking with MLflow: the store, run parameters, plots and `cascade runs`."""
