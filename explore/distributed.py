"""Large sample runs sharded over processes and machines, resumable.

    torchrun --nproc_per_node 2 -m explore.distributed sample --model_path M [flags as for `python -m explore sample`]

The run is cut into chunks of --batch_size images (chunk c holds images
c*B .. c*B+B-1, image i seeded with seed + i, exactly as a single-process run
cuts it). Rank r samples the chunks c with c % world_size == r and writes each
to <out_dir>/shards/ atomically; chunks already on disk are skipped, so a
killed run continues where it stopped. Rank 0 then merges the chunks into one
.npz, identical to the single-process result. gloo on CPU, NCCL on GPU.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from explore.__main__ import (CLIError, _int, make_registry, run_batches, split_flags, write_outputs)
from explore.engine import RecipeError
from explore.outputs import save_samples_npz


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (1 process without it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def chunks(total: int, batch_size: int) -> list[tuple[int, int, int]]:
    """(chunk index, first image, image count) covering `total` images."""
    return [(c, start, min(batch_size, total - start)) for c, start in enumerate(range(0, total, batch_size))]


def chunk_path(shard_dir: Path, c: int) -> Path:
    return shard_dir / f"chunk_{c:06d}.npz"


def sample_sharded(argv: list[str]) -> int:
    options, model_flags, classifier_flags = split_flags(argv)
    if not options["model_path"]:
        raise CLIError("--model_path is required")
    if options["noise"]:
        raise CLIError("--noise is not supported for sharded runs (each image draws its own noise from its seed)")
    rank, size, local_rank = world()
    distributed = size > 1
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            options["device"] = f"cuda:{local_rank}"
    try:
        registry = make_registry(options, model_flags, classifier_flags)
        total, batch = _int(options, "num_samples"), _int(options, "batch_size")
        if total < 1 or batch < 1:
            raise CLIError("--num_samples and --batch_size must be at least 1")
        out_dir = Path(options["out_dir"])
        shard_dir = out_dir / "shards"
        shard_dir.mkdir(parents=True, exist_ok=True)
        seed = int(options["seed"])
        mine = [ch for ch in chunks(total, batch) if ch[0] % size == rank]
        done = 0
        for c, start, count in mine:
            path = chunk_path(shard_dir, c)
            if path.exists():
                continue
            chunk_options = dict(options, seed=str(seed + start))
            images, labels, _ = run_batches(chunk_options, registry, count, count, f"rank {rank} chunk {c}")
            tmp = path.with_name(path.stem + f".rank{rank}.tmp.npz")
            save_samples_npz(tmp, images, labels)
            os.replace(tmp, path)
            done += 1
        print(f"rank {rank}: sampled {done} chunks, {len(mine) - done} were already on disk", file=sys.stderr)
        if distributed:
            dist.barrier()
        if rank == 0:
            return merge(options, registry, total, batch, shard_dir, out_dir)
        return 0
    finally:
        if distributed:
            dist.destroy_process_group()


def merge(options, registry, total: int, batch: int, shard_dir: Path, out_dir: Path) -> int:
    """Concatenate the chunks in order into the single-process output files."""
    from explore.__main__ import recipe_from
    missing = [c for c, _, _ in chunks(total, batch) if not chunk_path(shard_dir, c).exists()]
    if missing:
        raise CLIError(f"{len(missing)} chunks are missing ({missing[:5]}...); run the same command again to finish")
    images, labels = [], []
    for c, _, count in chunks(total, batch):
        with np.load(chunk_path(shard_dir, c), allow_pickle=False) as data:
            if len(data["arr_0"]) != count:
                raise CLIError(f"chunk {c} holds {len(data['arr_0'])} images, expected {count}; delete it and rerun")
            images.append(data["arr_0"])
            if "arr_1" in data.files:
                labels.append(data["arr_1"])
    recipe = recipe_from(options, total, int(options["seed"]))
    conditional = registry.get(recipe.model).num_labels is not None or bool(recipe.classifier)
    path = write_outputs(out_dir, np.concatenate(images), np.concatenate(labels) if labels else None,
                         recipe, conditional)
    print(f"saved {total} samples to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "sample":
        print(__doc__)
        return 2
    try:
        return sample_sharded(argv[1:])
    except (CLIError, RecipeError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
