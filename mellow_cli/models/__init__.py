"""Model families: one folder per family of audio-language models (encoder, prefix layout,
vocabulary, checkpoint layout), each behind the same small interface."""
