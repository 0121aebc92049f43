"""The bottom layer: user errors, the component registry, output-folder files. Imports nothing of
mtnlp."""
