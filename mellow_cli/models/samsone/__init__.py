"""Samsone (SamsungLabs/samsone, Interspeech 2026): a Whisper-tiny encoder, 50 pooled audio
tokens per clip, a projector and SmolLM2 with a pruned 34,111-token vocabulary.

config.py (sizes and presets), features.py (Whisper's log-mel), whisper.py (the encoder),
network.py (pooling, projection, the prefix), vocabulary.py (the pruned vocabulary and a
tokenizer in its ids), prompt.py (prompt normalisation), clip.py (channels and length),
checkpoint.py (the published `{"state_dict": ...}` layout), family.py (all of it behind the
family interface).
"""

from mellow_cli.models.samsone.family import SamsoneFamily

FAMILY = SamsoneFamily()
