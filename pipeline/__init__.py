"""Raw data to a registered model."""

from pipeline.quiet import quiet_torchao_import

# Every entry (stages, `pipeline`, Ray workers) imports this package first, before `transformers`
# or our fp8 path can import torchao: its import warnings are harmless here (pipeline/quiet.py).
quiet_torchao_import()
