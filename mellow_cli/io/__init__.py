"""Inputs and outputs: decoding audio files into clips (audio.py), reading what the user gives
(paths, folders, @lists, JSON lines: inputs.py), the rows of work and their results (jobs.py), and
result files in each format with --resume (outputs.py, formats.py). Knows no model.
"""
