"""The training stream: row i of the stream -> (normal image x0, synthetic-defect image x1, mask).

Row i belongs to epoch e = i // n_images and shows image perm_e[i % n_images], where perm_e is a
permutation seeded by (seed, e): every epoch is a fresh, reproducible shuffle. The defect of row
i is drawn from a generator seeded by (seed, i), so a stream is identical however it is split
into blocks, tasks or workers. Ray Data calls `make_pairs` in `map_batches` on CPU tasks.
"""

from __future__ import annotations

import numpy as np

from lasb.augment import AugmentConfig, synthesize_batch


def image_indices(row_ids: np.ndarray, n_images: int, seed: int) -> np.ndarray:
    row_ids = np.asarray(row_ids, dtype=np.int64)
    epochs = row_ids // n_images
    out = np.empty_like(row_ids)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n_images)
        sel = epochs == e
        out[sel] = perm[row_ids[sel] % n_images]
    return out


def row_seeds(row_ids: np.ndarray, seed: int) -> np.ndarray:
    return np.array(
        [np.random.SeedSequence([seed, int(i)]).generate_state(1)[0] for i in row_ids],
        dtype=np.int64,
    )


def make_pairs(
    batch: dict,
    images: np.ndarray,
    augment: AugmentConfig,
    seed: int,
    source: list[np.ndarray] | None = None,
    with_mask: bool = True,
) -> dict:
    """batch {"id": int64 (B,)} -> {"x0", "x1": uint8 (B,H,W,3), "mask": float32 (B,H,W)}.

    Training does not use the mask: without it (`with_mask=False`) a row is 40% smaller."""
    ids = np.asarray(batch["id"], dtype=np.int64)
    x0 = images[image_indices(ids, len(images), seed)]
    x1, mask = synthesize_batch(x0, row_seeds(ids, seed), augment, source)
    return {"x0": x0, "x1": x1, "mask": mask} if with_mask else {"x0": x0, "x1": x1}


def iterate_pairs(images: np.ndarray, n_rows: int, batch_size: int, augment: AugmentConfig,
                  seed: int, source=None, start: int = 0):
    """In-process version of the same stream (no Ray): yields batches of torch tensors."""
    import torch

    for lo in range(start, n_rows - batch_size + 1, batch_size):
        out = make_pairs({"id": np.arange(lo, lo + batch_size)}, images, augment, seed, source)
        yield {k: torch.from_numpy(v) for k, v in out.items()}
