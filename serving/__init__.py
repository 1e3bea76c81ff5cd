"""Registered models in use: loading ``models:/`` URIs (``loading``) and classifying images with them (``classify``).
What a logged model is belongs to ``zoo.model_format``; nothing here imports ``training``."""
