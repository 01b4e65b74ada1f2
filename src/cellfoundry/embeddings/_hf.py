"""Mean-pooled embeddings from a Hugging Face encoder stored in a local directory.

Shared by the `protein_lm` and `text` methods. Weights are read with `local_files_only=True`:
nothing is downloaded, so the methods run on compute nodes without network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def mean_pooled(
    model_dir: str | Path, texts: list[str], *, batch_size: int = 16, max_length: int = 1024
) -> np.ndarray:
    """One vector per text: the mean of the model's last hidden states over real tokens."""
    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"model directory {model_dir} does not exist (weights must be local)"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            hidden = model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu().numpy())
    if not out:
        return np.zeros((0, int(model.config.hidden_size)), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)
