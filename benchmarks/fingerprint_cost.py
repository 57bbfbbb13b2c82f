"""Cost of a dataset's content fingerprint (resume check, feature-cache key) on a large ImageFolder tree.

    python benchmarks/fingerprint_cost.py --classes 100 --per-class 500

Writes ``classes * per_class`` copies of one small PNG (distinct bytes per file) into a temporary
tree, then times ``ImageFolderDataset(...).fingerprint()`` (a stat per file and the bytes of 1,024
sampled files) and ``local_stamp()`` (a stat per file), each on a fresh dataset object.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

from PIL import Image

from clipcl.data.folders import ImageFolderDataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=500)
    args = parser.parse_args()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 200)).save(buffer, format="PNG")
    png = buffer.getvalue()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for label in range(args.classes):
            (root / f"class_{label:04d}").mkdir()
            for number in range(args.per_class):
                # Four bytes after the end of the PNG make every file distinct; image readers ignore them.
                (root / f"class_{label:04d}" / f"{number:05d}.png").write_bytes(png + number.to_bytes(4, "big"))
        files = args.classes * args.per_class
        started = time.perf_counter()
        dataset = ImageFolderDataset(root, "train")
        listed = time.perf_counter() - started
        started = time.perf_counter()
        dataset.fingerprint()
        fingerprint = time.perf_counter() - started
        started = time.perf_counter()
        ImageFolderDataset(root, "train").local_stamp()
        stamp = time.perf_counter() - started - listed
        print(f"{files} files ({len(dataset)} in the train split): listing {listed:.2f} s, "
              f"fingerprint {fingerprint:.2f} s, local stamp {stamp:.2f} s")


if __name__ == "__main__":
    main()
