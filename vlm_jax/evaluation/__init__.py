"""Evaluation: metrics, likelihood scoring, tasks, benchmark readers and the eval runner."""
