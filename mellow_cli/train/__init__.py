"""`mellow train`: the loop (loop.py), the two recipes and their options (recipe.py), training
files and datasets (data.py, datasets.py, templates.py), the objective and optimizer, where a
run's weights start, checkpoints and run folders, torchrun ranks, and synthesized tasks that prove
training works (tasks.py).
"""
