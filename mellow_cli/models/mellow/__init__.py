"""Mellow (arXiv 2503.08540): the log-mel front end and HTSAT encoder at 32 kHz, the mapper, the
two-clip prefix, and the published checkpoint layout (soham97/mellow).
"""

from mellow_cli.models.mellow.family import MellowFamily

FAMILY = MellowFamily()
