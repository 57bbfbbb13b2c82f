"""Time steps larger than memory: training pairs streamed from webdataset shards (``time.streaming``).

A streamed step's training pairs are never indexed: each process reads its own shards (split by rank),
each loader worker its own part of those (split by worker), through :mod:`webdataset`, in an order
reshuffled every pass from the run seed; a step's budget takes as many batches as it needs, passing
over the shards again when they run out (with replacement over passes, as TiC-CLIP's resampled shards).
Only the held-out 20% (by a hash of each sample's key, :func:`clipcl.data.time_stream.held_out_by_key`)
is indexed, for the step's retrieval test; the training stream skips exactly those samples.

What this gives up against indexed steps: which samples a step draws depends on the number of
processes and workers (each reads its own shards), so a streamed run is reproducible for a given
launch, not bit-equal across launches of other sizes; and a step draws whole shards, so a replay
buffer keeps whole shards of an old step.
"""

from __future__ import annotations

import hashlib
from itertools import islice
from pathlib import Path

import torch

from clipcl.data.base import DataError, files_stamp
from clipcl.data.caption_shards import IMAGE_EXTENSIONS, shard_paths


class StreamedShards:
    """A streamed step's training side: its shards and how many training samples they hold."""

    def __init__(self, shards: list[Path], samples: int, name: str) -> None:
        self.shards, self.samples, self.name = list(shards), samples, name

    def __len__(self) -> int:
        return self.samples

    def fingerprint(self) -> str:
        # The shards' names and sizes, and the count of training samples the scan found: reading every
        # image of a step larger than memory to digest it would cost a pass over the step.
        listing = [f"{path.name}:{path.stat().st_size}" for path in self.shards]
        return f"streamed/n={self.samples}/shards={hashlib.sha256(repr(listing).encode()).hexdigest()[:16]}"

    def local_stamp(self) -> str:
        return files_stamp(self.shards)


def _caption(sample: dict) -> str:
    import json

    if "txt" in sample:
        return sample["txt"].decode("utf-8").strip()
    record = json.loads(sample["json"].decode("utf-8")) if "json" in sample else {}
    found = record.get("caption", record.get("text")) if isinstance(record, dict) else None
    if isinstance(found, list):
        found = found[0] if found else None
    if not isinstance(found, str) or not found.strip():
        raise DataError(f"webdataset shard {sample.get('__url__')}: sample {sample.get('__key__')} has no caption")
    return found.strip()


def streamed_pairs(shards: list[Path], step: int, rank: int, world_size: int, seed: int, transform, held_out):
    """An IterableDataset of (pixels, caption, image id, step, None) items, as
    :class:`~clipcl.engine.batches.CaptionStreamImages` gives, from this process's share of ``shards``
    (every ``world_size``-th after a seeded shuffle), repeated; ``held_out(image key)`` samples are skipped."""
    import io

    import webdataset
    from PIL import Image

    def this_process(urls):
        return islice(urls, rank, None, world_size)

    def item(sample: dict):
        image_key = f"{Path(sample['__url__']).name}:{sample['__key__']}"
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if extension is None:
            raise DataError(f"webdataset shard {sample['__url__']}: sample {sample['__key__']} has no image")
        with Image.open(io.BytesIO(sample[extension])) as image:
            pixels = transform(image.convert("RGB"))
        # A stable 62-bit id per image: rows of one image are positives of each other, nothing else.
        image_id = int.from_bytes(hashlib.blake2b(image_key.encode(), digest_size=8).digest(), "big") >> 2
        return pixels, _caption(sample), image_id, step, None

    def kept(sample: dict) -> bool:
        return not held_out(f"{Path(sample['__url__']).name}:{sample['__key__']}")

    urls = [str(path) for path in shards]
    dataset = webdataset.WebDataset(urls, shardshuffle=len(urls), detshuffle=True, seed=seed,
                                    nodesplitter=this_process, workersplitter=webdataset.split_by_worker,
                                    empty_check=False)
    # Passes repeat without end (the loader takes the budget's batches); each pass reorders the shards
    # (detshuffle's epoch), and a sample-level shuffle within each reader, seeded, as open_clip's has.
    return dataset.select(kept).shuffle(1000, seed=seed).map(item).repeat()


def check_readers(shards: int, step: str, processes: int, workers: int) -> None:
    """One DataError line unless every process x loader worker gets a shard of its own."""
    if shards < processes * max(1, workers):
        raise DataError(f"time.streaming: step {step} has {shards} shard(s); each of the {processes} process(es) "
                        f"x {max(1, workers)} loader worker(s) needs one of its own")


def streamed_loader(pool: list[list[Path]], step: int, runtime, seed: int, transform, held_out, batch_size: int,
                    micro_batches: int, workers: int):
    """``micro_batches`` caption micro-batches of ``batch_size // world_size`` for this process, streamed from
    the shards of ``pool`` (one list per step the mode draws from)."""
    from clipcl.engine.batches import collate_captions

    shards = [path for step_shards in pool for path in step_shards]
    check_readers(len(shards), str(step), runtime.world_size, workers)
    pairs = streamed_pairs(shards, step, runtime.rank, runtime.world_size, seed, transform, held_out)
    batches = pairs.batched(batch_size // runtime.world_size, collation_fn=collate_captions, partial=False)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers)
    return islice(loader, micro_batches)


def scan_step(pattern, held_out, timestamp_key: str | None, name: str):
    """(test pairs, streamed training side) of one streamed step: the held-out samples indexed, the rest
    only counted."""
    from clipcl.data.caption_shards import WebDatasetShards

    test = WebDatasetShards(pattern, name=name, timestamp_key=timestamp_key, keep=held_out)
    return test, StreamedShards(shard_paths(pattern), test.skipped, name)
