"""Answering many questions: the one prediction loop that answers them in batches while the next
batch's audio decodes (loop.py), and the run of ask, compare and caption from their options to
the rows written (run.py). Below the CLI, bench and serve; above the model's API.
"""
