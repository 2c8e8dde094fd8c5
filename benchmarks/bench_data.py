"""Data-path throughput: images/s of 2 global + 10 local crops, DALI vs the CPU pipeline.

    python -m benchmarks.bench_data                     # GPU machine: DALI + CPU sweep
    python -m benchmarks.bench_data --data /data/imagenet/train --workers 4,8,16
    python -m benchmarks.bench_data --smoke             # tiny, CPU only, seconds

Each row times one loader exactly as the trainer builds it (`build_train_loader`, so the
masks, the crop-major batch and, for the CPU path on a GPU machine, the pinned copy to the
device are included): after a warm-up (worker start-up, pipeline build), batches are
drawn for at least `--seconds` (and `--min-batches`); images/s = images / wall time, the
GPU synchronised at the end. The warm-up is `--warmup` batches plus the (workers + 1) x
prefetch batches queued during start-up, so the figure is the steady rate. Epochs wrap
around, so a small folder is read from the page cache: these are augmentation figures,
not disk figures.

Rows:
  dali   gpu   nvJPEG decode + crops on the GPU (`data.num_workers` reader processes and
               DALI threads, swept with --dali-workers)
  dali   cpu   the same DALI graph on the CPU (`device_id=None`), all cores (--dali-cpu)
  cpu    cpu   PIL + torch DataLoader (`cpu.MultiCropDataset` / `Collate`), k workers,
               batch 32 (its cost is per image; a small batch keeps its warm-up short)
About 70-90 s on a 16-core GPU machine with the defaults (most of it the CPU rows).
Without --data, a folder of synthetic JPEGs (500x375, quality 90: ImageNet's typical size) is
made once under /tmp. The goal of issue 7, on an H100 with 16 cores: DALI feeds >= 1.5x
the fast step's images/s for ViT-S/16 (pass that figure as --step-img-per-s to print the
ratio). Set IBOT_FAST_RESULTS to keep smoke rows out of benchmarks/results/.
"""
import argparse
import gc
import os
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from benchmarks import common

SMOKE = dict(images=32, size=(64, 48), global_size=32, local_size=16, n_local=2,
             batch_size=8, patch_size=8)
FULL = dict(images=2048, size=(500, 375), global_size=224, local_size=96, n_local=10,
            batch_size=128, patch_size=16)


def _write_jpeg(job):
    path, seed, (width, height) = job
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC),
                     dtype=np.float32)
    img = np.clip(img + rng.normal(0.0, 12.0, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, "JPEG", quality=90)


def synthetic_folder(n, size, classes=8, root=None) -> Path:
    """n JPEGs of `size` (width, height) in `classes` sub-folders, made once (in parallel)
    under `root` (default /tmp): smooth colour fields plus pixel noise, quality 90, about
    75 KB at 500 x 375 (ImageNet's JPEGs average ~110 KB at a similar size)."""
    folder = Path(root or "/tmp") / f"ibot_fast_bench_jpeg_{n}_{size[0]}x{size[1]}"
    jobs = [(folder / f"class{i % classes:02d}" / f"img{i:06d}.jpg", i, size) for i in range(n)]
    if all(path.exists() for path, _, _ in jobs):
        return folder
    for c in range(classes):
        (folder / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    todo = [job for job in jobs if not job[0].exists()]
    workers = max(1, min(16, os.cpu_count() or 1, len(todo) // 16))
    if workers == 1:
        for job in todo:
            _write_jpeg(job)
    else:
        with Pool(workers) as pool:
            pool.map(_write_jpeg, todo, chunksize=16)
    return folder


def synthetic_shards(folder: Path, per_shard: int = 1000) -> Path:
    """The JPEGs of `synthetic_folder` as webdataset shards (`<key>.jpg` and `<key>.cls`
    members, `per_shard` images each) in a sibling folder `<folder>_wds`, made once."""
    import io
    import tarfile

    out = Path(f"{folder}_wds")
    done = out / ".complete"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(folder.glob("class*/*.jpg"))
    for s, start in enumerate(range(0, len(files), per_shard)):
        with tarfile.open(out / f"train-{s:04d}.tar", "w") as tf:
            for path in files[start:start + per_shard]:
                key = f"{path.parent.name}_{path.stem}"
                tf.add(path, arcname=f"{key}.jpg")
                label = str(int(path.parent.name[len("class"):])).encode()
                info = tarfile.TarInfo(f"{key}.cls")
                info.size = len(label)
                tf.addfile(info, io.BytesIO(label))
    done.touch()
    return out


def make_cfg(data, shape, pipeline, workers, prefetch):
    from ibot_fast.config import build_config

    return build_config("vit_small_16_paper", [
        f"data.path={data}", f"data.pipeline={pipeline}", f"data.num_workers={workers}",
        f"data.prefetch={prefetch}", f"data.global_size={shape['global_size']}",
        f"data.local_size={shape['local_size']}", f"data.n_local={shape['n_local']}",
        f"train.batch_size={shape['batch_size']}", f"model.patch_size={shape['patch_size']}"])


def measure(cfg, device, seconds, min_batches, warmup):
    """Build the trainer's loader, warm it up, then time batches; returns a row."""
    from ibot_fast.data import build_train_loader

    t0 = time.perf_counter()
    loader = build_train_loader(cfg, device=device)
    epoch = 0
    loader.set_epoch(epoch)
    batches = iter(loader)

    def next_batch():
        nonlocal epoch, batches
        while True:
            try:
                batch = next(batches)
                break
            except StopIteration:
                epoch += 1
                loader.set_epoch(epoch)
                batches = iter(loader)
        if device.type == "cuda":  # what the step does with them (the CPU path's copy)
            batch["globals"].to(device, non_blocking=True)
            batch["locals"].to(device, non_blocking=True)
        return batch

    next_batch()
    first_batch_s = time.perf_counter() - t0
    for _ in range(warmup):
        next_batch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n_batches, n_bad = 0, 0
    start = time.perf_counter()
    while n_batches < min_batches or time.perf_counter() - start < seconds:
        n_bad += next_batch()["n_bad"]
        n_batches += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    del batches, loader
    gc.collect()
    images = n_batches * cfg.train.batch_size
    return {"images": images, "seconds": round(elapsed, 3), "img_per_s": images / elapsed,
            "first_batch_s": round(first_batch_s, 2), "bad": n_bad}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="ImageFolder root (default: synthetic JPEGs)")
    parser.add_argument("--workers", default=None,
                        help="CPU pipeline worker counts, comma-separated (default 1,4,8,all)")
    parser.add_argument("--dali-workers", default=None,
                        help="DALI reader processes / threads, comma-separated (default 8,all)")
    parser.add_argument("--dali-cpu", action="store_true",
                        help="also time the DALI graph on the CPU (all cores)")
    parser.add_argument("--batch-size", type=int, default=FULL["batch_size"],
                        help="per-process batch of the DALI rows")
    parser.add_argument("--cpu-batch-size", type=int, default=32,
                        help="batch of the CPU-pipeline rows (its cost is per image; a small "
                        "batch keeps its warm-up short)")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per row")
    parser.add_argument("--min-batches", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2,
                        help="batches after the first, besides those prefetched")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--step-img-per-s", type=float, default=None,
                        help="the fast ViT-S/16 step's images/s, for the feed ratio")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU, seconds")
    args = parser.parse_args(argv)

    shape = SMOKE if args.smoke else FULL
    cores = os.cpu_count() or 1
    gpu = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if gpu else "cpu")
    seconds = 1.0 if args.smoke else args.seconds
    data = args.data or synthetic_folder(shape["images"], shape["size"])

    def counts(text, default):
        values = [int(v) for v in text.split(",")] if text else default
        return sorted(set(min(v, cores) for v in values))

    cpu_workers = counts(args.workers, [0, 1] if args.smoke else [1, 4, 8, cores])
    dali_workers = counts(args.dali_workers, [8, cores])
    dali_batch = shape["batch_size"] if args.smoke else args.batch_size
    cpu_batch = shape["batch_size"] if args.smoke else args.cpu_batch_size
    try:
        import nvidia.dali as dali
        dali_error = None
    except Exception as e:  # noqa: BLE001 - any import failure means "no DALI rows"
        dali, dali_error = None, f"{type(e).__name__}: {e}"

    plan = []  # (pipeline, where the crops are made, workers, batch size)
    if dali is not None:
        if gpu:
            plan += [("dali", "gpu", k, dali_batch) for k in dali_workers]
        if args.smoke or args.dali_cpu:
            plan.append(("dali", "cpu", 0 if args.smoke else cores, dali_batch))
    plan += [("cpu", "cpu", k, cpu_batch) for k in cpu_workers]

    rows = []
    if dali_error:
        rows.append({"bench": "data", "pipeline": "dali", "error": dali_error,
                     "smoke": args.smoke})
        common.record("data", rows[-1:], device)
    for pipeline, where, workers, batch in plan:
        run_device = device if where == "gpu" or pipeline == "cpu" else torch.device("cpu")
        cfg = make_cfg(data, {**shape, "batch_size": batch}, pipeline, workers, args.prefetch)
        row = {"bench": "data", "pipeline": pipeline, "augment_on": where, "workers": workers,
               "batch_size": batch, "global_size": shape["global_size"],
               "local_size": shape["local_size"], "n_local": shape["n_local"],
               "data": str(data), "synthetic": args.data is None, "smoke": args.smoke}
        print(f"measuring {pipeline} ({where}, {workers} workers, batch {batch}) ...",
              flush=True)
        # the warm-up also drains what the workers (and DALI) prefetched while starting
        warmup = 0 if args.smoke else args.warmup + (workers + 1) * args.prefetch
        try:
            row.update(measure(cfg, run_device, seconds, args.min_batches, warmup))
        except Exception as e:  # noqa: BLE001 - a failed row is recorded, the sweep goes on
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
        if args.step_img_per_s and "img_per_s" in row:
            row["feed_ratio"] = row["img_per_s"] / args.step_img_per_s
        rows.append(row)
        path = common.record("data", [row], device)  # row by row: a timeout keeps the rest

    print(f"device: {common.device_name(device)}; {cores} CPU cores; DALI "
          f"{dali.__version__ if dali else 'not available (' + dali_error + ')'}; "
          f"rows appended to {path if plan else '-'}")
    if args.smoke:
        print("smoke run: tiny crops on the CPU; the figures say nothing about speed")
    columns = ["pipeline", "augment_on", "workers", "batch_size", "n_local", "img_per_s",
               "first_batch_s", "images", "seconds", "error"]
    if args.step_img_per_s:
        columns.insert(6, "feed_ratio")
    common.print_table(rows, columns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
