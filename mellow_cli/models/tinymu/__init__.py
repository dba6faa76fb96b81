"""TinyMU (arXiv 2604.15849; the authors' code is xiquan-li/TinyMU): music understanding from a
MATPAC++ ViT-B encoder at 16 kHz, a two-layer projector and SmolLM2-135M, 229M parameters.

One clip per question. config.py holds the dimensions, frontend.py the log-mel, matpac.py the
encoder, network.py the whole model and its prefix, prompt.py the prompt's tokens, clip.py the
clip a file gives, checkpoint.py the published file layout.
"""

from mellow_cli.models.tinymu.family import TinyMUFamily

FAMILY = TinyMUFamily()
