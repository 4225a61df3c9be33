"""Image ingest throughput: Ray Data tasks vs ``torch.utils.data.DataLoader``, same work.

Both sides run the same per-image code on the same read units (the default scikit-image set,
``--repeat`` times, so fixed start-up costs are amortised): read the bytes
(:func:`megaray.data.image.read_unit`), Pillow decode + EXIF orientation + RGB + resize to shorter
side ``--size`` (:func:`megaray.data.image.process_image`), a random ``--crop`` window and flip
(:func:`megaray.data.image.crop_box`) normalised to float32 [-1, 1] ``(3, crop, crop)``, which
travels back to the consumer. ``--workers`` processes on each side (Ray: ``map_batches`` tasks
with that ``concurrency``, one CPU each; PyTorch: a DataLoader with that many workers). Nothing is
written. Each side runs ``--passes`` times; the first pass includes starting worker processes,
the best pass is the steady-state figure. Prints one JSON object::

    python benchmarks/image_ingest.py --repeat 4 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default="skimage", help="image source (folder, tar, parquet, or skimage)")
    p.add_argument("--repeat", type=int, default=4, help="process the unit list this many times per pass")
    p.add_argument("--workers", type=int, default=2, help="Ray tasks at a time / DataLoader workers")
    p.add_argument("--batch-size", type=int, default=8, help="units per Ray map_batches call")
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--size", type=int, default=256, help="stored shorter side")
    p.add_argument("--crop", type=int, default=224, help="crop side")
    return p.parse_args(argv)


def crops_of_unit(u, size: int, crop: int):
    """Decode-resize-crop every image of one read unit -> list of float32 (3, crop, crop)."""
    from megaray.data import image as I

    settings, out = I.ImagePrepSettings(size=size), []
    for it in I.read_unit(u):
        if it["code"]:
            continue
        try:
            hwc = I.process_image(it["data"], settings)
        except I.RejectedImage:
            continue
        h, w = hwc.shape[:2]
        top, left, flip = I.crop_box(0, it["name"], 0, h, w, crop)
        patch = hwc[top : top + crop, left : left + crop]
        patch = patch[:, ::-1] if flip else patch
        out.append(patch.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)
    return out


class UnitDataset:
    """Map-style dataset: unit -> stacked crops ``(n, 3, crop, crop)``."""

    def __init__(self, units, size, crop):
        self.units, self.size, self.crop = units, size, crop

    def __len__(self):
        return len(self.units)

    def __getitem__(self, i):
        crops = crops_of_unit(self.units[i], self.size, self.crop)
        return np.stack(crops) if crops else np.zeros((0, 3, self.crop, self.crop), np.float32)


def run_dataloader(units, args):
    import torch

    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(
        UnitDataset(units, args.size, args.crop), batch_size=None, num_workers=args.workers, collate_fn=lambda x: x
    )
    t0 = time.perf_counter()
    n = sum(len(x) for x in loader)
    return n, time.perf_counter() - t0


def _ray_batch(batch, *, size, crop):
    keys = list(batch)
    crops = []
    for i in range(len(batch["kind"])):
        u = {k: (batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i]) for k in keys}
        crops += crops_of_unit(u, size, crop)
    return {"image": np.stack(crops) if crops else np.zeros((0, 3, crop, crop), np.float32)}


def run_ray(units, args):
    import ray

    t0 = time.perf_counter()
    ds = ray.data.from_items(units, override_num_blocks=max(1, min(len(units), 4 * args.workers))).map_batches(
        _ray_batch,
        fn_kwargs={"size": args.size, "crop": args.crop},
        batch_size=args.batch_size,
        compute=ray.data.TaskPoolStrategy(size=args.workers),
        num_cpus=1,
        batch_format="numpy",
    )
    n = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n += len(batch["image"])
    return n, time.perf_counter() - t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    import ray
    from ray.data import DataContext

    from megaray.data.image import collect_units

    units, _ = collect_units(args.source)
    units = units * args.repeat
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(4, args.workers + 2), include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    result = {
        "source": args.source,
        "units": len(units),
        "workers": args.workers,
        "size": args.size,
        "crop": args.crop,
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 1),
    }
    for name, fn in (("ray_data", run_ray), ("dataloader", run_dataloader)):
        passes = []
        for _ in range(args.passes):
            n, s = fn(units, args)
            passes.append({"images": n, "seconds": round(s, 3), "images_per_s": round(n / s, 2)})
        result[name] = {
            "passes": passes,
            "first_pass_images_per_s": passes[0]["images_per_s"],
            "best_images_per_s": max(p["images_per_s"] for p in passes),
        }
    result["load_average_1m_at_end"] = round(os.getloadavg()[0], 1)
    result["ray_over_dataloader_best"] = round(
        result["ray_data"]["best_images_per_s"] / result["dataloader"]["best_images_per_s"], 3
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
