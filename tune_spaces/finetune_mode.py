"""Which fine-tuning mode: the whole model, the mask decoder alone, or LoRA on the encoder?"""

SPACE = {
    "student.mode": {"grid": ["full", "decoder", "lora"]},
}
