"""Running a loaded language model: the one SmolLM2 forward with its KV cache (llama.py),
generation and choice scoring (generate.py, options.py), the tokenizer, and how weights are held
and multiplied (precision.py, int8_copy.py) with the C step built per machine (fused.py, passes.py,
step.c). Knows no audio encoder.
"""
