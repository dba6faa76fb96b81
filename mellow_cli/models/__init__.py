"""Model families: the interface every family implements (family.py), the catalogue of names
users can type (catalogue.py), and one folder per family holding everything that differs
between them (front end, encoder, projector, prompt layout, checkpoint layout).
"""
