"""The detection task: boxes rather than class maps (tree crowns, buildings, vehicles, panels).

Modules here belong to detection only; what both tasks use (stores, configs, Ray runtime, band
handling) stays in ``semisup``.
"""
