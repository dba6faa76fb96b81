"""`mellow serve`: the OpenAI-style HTTP app (app.py) and the worker that batches its requests
through one loaded model (worker.py).
"""
