"""Evaluation: task accuracy on question/answer sets (tasks.py)."""
