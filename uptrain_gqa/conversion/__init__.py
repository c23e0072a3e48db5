"""The conversion stage: MHA -> GQA (or fewer KV heads), streaming, with pooling or least-squares merges."""
