"""Data sections: text and image sources, splits, cleaning, augmentation, sharding."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.schema.fields import (
    Fraction,
    NonNegFloat,
    NonNegInt,
    PositiveInt,
    Strict,
)


class SplitConfig(Strict):
    """Fractions of examples per split; assignment is a stable hash of the example."""

    train: Fraction = 0.8
    val: Fraction = 0.1
    test: Fraction = 0.1
    # Keys the split assignment, apart from the top-level `seed`: runs that differ only in their
    # training seed are scored on the same test set. 1337 (the top-level default) keeps the splits
    # that configs made before this key existed.
    seed: NonNegInt = 1337

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1 (got {total:g})")
        if self.val == 0 or self.test == 0 or self.train == 0:
            raise ValueError("every split needs a non-zero fraction")
        return self


class TextDataConfig(Strict):
    """A text corpus for the language model."""

    kind: Literal["text"] = "text"
    source: str = Field("builtin:python-docs", description="builtin:python-docs, a .txt/.md/.rst/.jsonl/.parquet "
                        "file or folder, or a Hugging Face `datasets` save_to_disk folder")
    text_field: str = "text"  # the text column of JSONL, Parquet and Hugging Face sources
    # Of .txt/.md/.rst/.jsonl files: "auto" reads UTF-8, repairs stray bytes, detects other encodings
    # and skips binary files (all counted in the data statistics); a codec name (cp1252) is used strictly.
    encoding: str = "auto"
    min_chars: NonNegInt = 20
    # Exact repeats are always dropped. Near-duplicates (MinHash LSH over word 5-grams, about 0.7
    # Jaccard and up, chained) always share one split, so none is held out from its own copy in
    # train; "drop" also keeps only one of each cluster (the one with the smallest content hash).
    near_duplicates: Literal["keep", "drop"] = "keep"
    split: SplitConfig = SplitConfig()
    vocab_size: Annotated[int, Field(ge=260)] = 2048
    tokenizer_max_chars: PositiveInt = 50_000_000  # larger training splits are sampled evenly to this size
    seq_len: PositiveInt = 128
    shard_rows: PositiveInt = 512
    shard_compression: Literal["none", "lz4", "zstd"] = "none"  # none: memory-mapped, no decoding
    ray: bool = False  # prepare (one task per file) and shard (tokenization) as Ray tasks, local or cluster

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        if v != "auto":
            try:
                "a".encode(v)  # a text codec (not base64 and the like)
            except LookupError:
                raise ValueError("not a text encoding Python knows (e.g. auto, utf-8, cp1252, latin-1)") from None
        return v


class AugmentConfig(Strict):
    """Label-preserving image augmentation (no flips: a flipped digit is another digit)."""

    copies: NonNegInt = 2
    rotate_deg: NonNegFloat = 10.0
    shift_px: NonNegFloat = 1.0
    noise_std: NonNegFloat = 0.02
    color_jitter: Annotated[float, Field(ge=0, lt=1)] = 0.0  # colour: brightness/contrast/saturation x [1-j, 1+j]


class ImageDataConfig(Strict):
    """Labelled images for the diffusion model."""

    kind: Literal["images"] = "images"
    source: str = Field("builtin:digits", description="builtin:digits, an .npz (images, labels) or a class-folder tree")
    image_size: PositiveInt = 8
    split: SplitConfig = SplitConfig()
    augment: AugmentConfig = AugmentConfig()
    # Class imbalance in the training split: oversample the smaller classes to the largest (seeded
    # repeats, before augmentation), or keep the data and weight each example's loss by
    # N / (classes x its class count). The statistics always report counts per class and split.
    balance: Literal["none", "oversample", "weights"] = "none"
    shard_rows: PositiveInt = 1024
    shard_compression: Literal["none", "lz4", "zstd"] = "none"
