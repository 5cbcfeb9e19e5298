"""export: safetensors + spec, ONNX (checked in onnxruntime), and an MLflow pyfunc model."""

from pathlib import Path

from pipeline.cli import stage_main
from pipeline.config import PipelineConfig
from pipeline.flows.export import export


def run(cfg: PipelineConfig, task: str) -> None:
    info = export(cfg, task, Path(f"models/{task}"), Path(f"data/{task}/shards"), Path(f"export/{task}"),
                  Path(f"metrics/{task}"))
    print(f"[{task}] exported to export/{task}: ONNX max |diff| {info['onnx_max_abs_diff']:.2e}; "
          f"MLflow model {info['model_uri']}")


if __name__ == "__main__":
    stage_main("export", run)
