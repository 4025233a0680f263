"""Which LoRA rank? Every rank of the grid, with alpha tied to the rank.

alpha = 2 × rank keeps LoRA's scale (alpha / rank) at 2, the reference recipe's 16 / 8, so the
ranks differ in capacity and not in effective learning rate.
"""

SPACE = {
    "student.mode": "lora",
    "student.lora_rank": {"grid": [4, 8, 16, 32]},
    "student.lora_alpha": {"tied_to": "student.lora_rank", "factor": 2.0},
}
