"""overnight: LoRA/QLoRA fine-tuning you can leave running overnight."""

__version__ = "0.1.0"
