"""Where models come from and live: hub downloads pinned and verified (hub.py), the model cache's
folders (cache.py), reading and converting checkpoints (conversion.py), building a network from a
cached folder (loading.py), tokenizer files (tokenizers.py), and export to the authors' layout.
"""
