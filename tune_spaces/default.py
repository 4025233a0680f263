"""A joint space: fine-tuning mode, LoRA rank, learning rate, and the main SSL and augmentation
knobs, each over a range around the reference recipe."""

SPACE = {
    "student.mode": {"choice": ["decoder", "lora"]},
    "student.lora_rank": {"choice": [4, 8, 16]},
    "student.lora_alpha": {"tied_to": "student.lora_rank", "factor": 2.0},
    "train.lr": {"loguniform": [1e-4, 3e-3]},
    "ssl.confidence_threshold": {"uniform": [0.8, 0.97]},
    "ssl.unlabeled_weight": {"loguniform": [0.5, 2.0]},
    "augment.cutmix_prob": {"uniform": [0.25, 0.75]},
    "augment.colour_strength": {"uniform": [0.1, 0.4]},
}
