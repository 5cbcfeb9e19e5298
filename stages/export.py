"""export: safetensors + spec, ONNX (checked in onnxruntime), and an MLflow pyfunc model."""

from pathlib import Path

from pipeline.cli import stage_main
from pipeline.config import PipelineConfig
from pipeline.flows.export import export


def run(cfg: PipelineConfig, task: str) -> None:
    info = export(cfg, task, Path(f"models/{task}"), Path(f"data/{task}/shards"), Path(f"export/{task}"),
                  Path(f"metrics/{task}"))
    # None when `export.onnx` is off: this line runs after the export is committed and logged, so a
    # crash here would fail the stage (and skip register) for an export that succeeded
    diff = info["onnx_max_abs_diff"]
    onnx = "ONNX skipped (export.onnx false)" if diff is None else f"ONNX max |diff| {diff:.2e}"
    print(f"[{task}] exported to export/{task}: {onnx}; MLflow model {info['model_uri']}")
    if info.get("hf_architecture"):
        print(f"[{task}] transformers folder export/{task}/hf ({info['hf_architecture']}, {info['hf_dtype']}): "
              f"logits max |diff| {info['hf_max_abs_logit_diff']:.2e}, greedy tokens equal")
    elif "hf_skipped" in info:
        print(f"[{task}] no transformers folder: {info['hf_skipped']}")
    if "int8_val_perplexity" in info:
        print(f"[{task}] int8 ONNX: {info['int8_size_ratio']:.2f}x the size, val perplexity "
              f"{info['fp32_val_perplexity']:.2f} -> {info['int8_val_perplexity']:.2f} "
              f"({100 * info['int8_val_perplexity_change']:+.2f}%)")


if __name__ == "__main__":
    stage_main("export", run)
