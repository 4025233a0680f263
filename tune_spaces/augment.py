"""Which strong-view augmentation recipe: rotation, scale, colour strength and CutMix.

Ranges bracket the reference recipe (±180°, scale 0.75–1.33, colour 0.2, CutMix 0.5).
"""

SPACE = {
    "augment.rotation_deg": {"uniform": [0.0, 180.0]},
    "augment.scale_min": {"uniform": [0.5, 1.0]},
    "augment.scale_max": {"uniform": [1.0, 2.0]},
    "augment.colour_strength": {"uniform": [0.0, 0.5]},
    "augment.cutmix_prob": {"uniform": [0.0, 1.0]},
}
