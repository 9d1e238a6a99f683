"""Training: `train(...)` over a run's typed records (`recipe`), the data (`data`), the loop (`loop`),
the rank sweep (`sweep`) and the shipped task (`tasks`).

    from lorakit.train import train
    train(data="my.jsonl", out="runs/mine", r=16)
"""

from .loop import train
from .recipe import DataSettings, ModelSettings, OptimSettings, Recipe, RunSettings, lora_config

__all__ = ["train", "Recipe", "ModelSettings", "DataSettings", "OptimSettings", "RunSettings", "lora_config"]
