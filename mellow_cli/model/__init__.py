"""The Mellow network: log-mel front end (frontend.py), HTSAT encoder (htsat.py), and the mapper,
sequence assembly and SmolLM2 decoder (mellow.py)."""
