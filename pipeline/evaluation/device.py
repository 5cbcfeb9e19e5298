"""Which device the evaluate stage runs the model on (`eval.device`)."""

from __future__ import annotations

import torch


def eval_device(choice: str) -> torch.device:
    """auto: the first CUDA device when this machine has one, else the CPU; cuda without one is
    an error naming the key, raised before the model is loaded."""
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if choice == "cuda":
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"eval.device=cuda, but torch ({torch.__version__}, {build}) finds no CUDA device on "
                         "this machine; use eval.device=auto or cpu")
    return torch.device("cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's weights are on (inputs go there); the CPU for one without any."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
