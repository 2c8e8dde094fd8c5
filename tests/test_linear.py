"""Linear probe: the one-pass multi-lr training, features, DDP extraction, the command."""
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ibot_fast import UserError, checkpoint
from ibot_fast.config import build_config, to_dict
from ibot_fast.data.datasets import DigitsDataset
from ibot_fast.eval.knn import extract_features as knn_extract_features
from ibot_fast.eval.knn import knn_classify, knn_eval_backbone, random_init_backbone
from ibot_fast.eval.linear import (cmd_linear, extract_features, feature_spec,
                                   linear_eval_backbone, linear_probe, train_linear)


def clusters(n, dim, classes, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def test_one_pass_equals_one_torch_sgd_run_per_lr():
    """Each classifier of the batched one-pass training is exactly what torch.optim.SGD
    (momentum, weight decay, the cosine lr) gives for that lr alone on the same batches."""
    x, y = clusters(300, 16, 4, seed=1)
    lrs, epochs, batch, momentum, wd, seed = [0.01, 0.3, 3.0], 3, 64, 0.9, 1e-3, 5
    clf, history = train_linear(x, y, lrs, 4, epochs=epochs, batch_size=batch,
                                momentum=momentum, weight_decay=wd, seed=seed,
                                eval_features=x, eval_labels=y)
    assert history.shape == (epochs, len(lrs))

    g = torch.Generator().manual_seed(seed)  # the same draws: init, then one perm per epoch
    init = torch.randn(len(lrs), 16, 4, generator=g) * 0.01
    perms = [torch.randperm(300, generator=g) for _ in range(epochs)]
    total = epochs * math.ceil(300 / batch)
    for i, lr in enumerate(lrs):
        ref = torch.nn.Linear(16, 4)
        with torch.no_grad():
            ref.weight.copy_(init[i].T)
            ref.bias.zero_()
        opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
        step = 0
        for perm in perms:
            for start in range(0, 300, batch):
                idx = perm[start:start + batch]
                opt.param_groups[0]["lr"] = lr * batch / 256 * 0.5 * (
                    1 + math.cos(math.pi * step / total))
                opt.zero_grad()
                F.cross_entropy(ref(x[idx]), y[idx]).backward()
                opt.step()
                step += 1
        torch.testing.assert_close(clf.weight[i], ref.weight.T, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(clf.bias[i, 0], ref.bias, rtol=1e-4, atol=1e-6)
    for i in range(len(lrs) - 1):  # the lrs really gave different classifiers
        assert (clf.weight[i] - clf.weight[i + 1]).abs().max() > 1e-3


def test_best_lr_is_the_max_over_lrs_and_epochs():
    x, y = clusters(400, 8, 3, seed=2)
    xt, yt = clusters(200, 8, 3, seed=2)  # same centres (same seed), fresh noise
    lrs = [1e-4, 1e-2, 1.0]
    r = linear_probe(x[:200], y[:200], xt, yt, lrs, epochs=10, batch_size=32)
    assert r["lrs"] == lrs and len(r["top1"]) == len(r["final"]) == 3
    assert r["best_top1"] == max(r["top1"]) and r["best_lr"] == lrs[r["top1"].index(max(r["top1"]))]
    assert all(best >= last for best, last in zip(r["top1"], r["final"]))
    assert r["top1"][0] < r["best_top1"]  # the tiny lr trails: the choice of lr matters


@pytest.mark.parametrize("w, h, resized, offset", [
    (640, 427, (383, 256), (80, 16)),    # 256 x 640 / 427 = 383.6, truncated; 79.5 -> 80
    (427, 640, (256, 383), (16, 80)),
    (500, 375, (341, 256), (58, 16)),    # 341.3 -> 341; 58.5 -> 58 (half to even)
    (300, 300, (256, 256), (16, 16)),
    (225, 100, (576, 256), (176, 16)),
])
def test_eval_transform_does_the_official_resize_and_centre_crop(w, h, resized, offset):
    """torchvision's Resize(256) (shorter side to 256, the longer int(256 x long /
    short)) and CenterCrop(224) (offsets int(round((side - 224) / 2)), half to even), as
    the official evaluation runs them, written out."""
    from PIL import Image

    from ibot_fast.data.cpu import to_tensor
    from ibot_fast.eval.knn import eval_transform

    g = torch.Generator().manual_seed(w * h)
    img = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g,
                                        dtype=torch.uint8).numpy())
    left, top = offset
    expected = to_tensor(img.resize(resized, Image.BICUBIC).crop(
        (left, top, left + 224, top + 224)))
    out = eval_transform(img, 224)
    assert out.shape == (3, 224, 224)
    assert torch.equal(out, expected)


def test_feature_spec_follows_the_official_protocol():
    official = {"vit_small": (4, False), "vit_base": (1, True), "vit_large": (1, True)}
    for arch, (n_blocks, avgpool) in official.items():
        assert feature_spec(arch) == {"n_blocks": n_blocks, "avgpool": avgpool,
                                      "standardize": False}
    assert feature_spec("vit_demo") == {"n_blocks": 4, "avgpool": False, "standardize": True}
    cfg = build_config("demo")
    backbone = random_init_backbone(cfg)
    source = DigitsDataset("test")
    source.targets, source.images = source.targets[:8], source.images[:8]
    f4, y = extract_features(backbone, source, 32, torch.device("cpu"), 4, False)
    f1p, _ = extract_features(backbone, source, 32, torch.device("cpu"), 1, True)
    assert f4.shape == (8, 4 * 128) and f1p.shape == (8, 2 * 128)
    torch.testing.assert_close(f4[:, 3 * 128:], f1p[:, :128])  # CLS of the last block
    with torch.no_grad():
        from ibot_fast.eval.knn import eval_transform
        x = torch.stack([eval_transform(source.load(i)[0], 32) for i in range(8)])
        tokens = backbone.eval()(x)
    torch.testing.assert_close(f1p[:, :128], tokens[:, 0])
    torch.testing.assert_close(f1p[:, 128:], tokens[:, 1:].mean(1))
    assert y.tolist() == source.targets.tolist()
    # so the k-NN printed beside the probe (normalised last CLS) is the k-NN's own feature
    knn_f, _ = knn_extract_features(backbone, source, 32, torch.device("cpu"))
    torch.testing.assert_close(F.normalize(f4[:, 3 * 128:], dim=-1), knn_f)
    # eval.precision=bf16: the same features under bf16 autocast (fp32 above: official)
    low, _ = extract_features(backbone, source, 32, torch.device("cpu"), 1, True,
                              precision="bf16")
    assert not torch.equal(low, f1p)
    torch.testing.assert_close(low, f1p, rtol=0.05, atol=0.05)


def test_linear_probe_beats_random_init_knn_on_digits(capsys):
    """The linear probe (features once, 3 lrs in one pass; the demo model's defaults: CLS
    of the last 4 blocks, standardised) on the digits test split, beside the k-NN of the
    same random-init network (from the same features, the last block's CLS: see the test
    above), which it must beat by a wide margin."""
    torch.manual_seed(0)
    cfg = build_config("demo")
    backbone = random_init_backbone(cfg)
    device = torch.device("cpu")
    r = linear_eval_backbone(cfg, backbone, device, lrs=(0.01, 0.1, 1.0), epochs=30)
    assert (r["n_train"], r["n_test"], r["dim"]) == (1437, 360, 512)
    knn = r["knn"]
    assert set(knn) == set(cfg.eval.knn_k)
    with capsys.disabled():
        print(f"\n  digits, random-init demo ViT: linear top-1 {r['best_top1']:.1f}% "
              f"(lr {r['best_lr']}) vs k-NN {max(knn.values()):.1f}% (best k)")
    assert r["best_top1"] > max(knn.values()) + 15
    # three classifiers, each trained at its own lr (their accuracies may tie on some
    # CPUs: assert what the code promises, not which lr wins by one image)
    weights = r["classifiers"].weight.detach()
    assert len(r["top1"]) == 3 and all((weights[i] - weights[j]).abs().max() > 1e-3
                                       for i in range(3) for j in range(i + 1, 3))
    assert r["best_top1"] == max(r["top1"])
    assert r["best_lr"] == r["lrs"][r["top1"].index(r["best_top1"])]
    assert r["top1"][0] < r["best_top1"] - 5  # the lr matters: 0.01 is far too small here


def save_checkpoint(path, cfg, backbone):
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    checkpoint.save(path, {"config": to_dict(cfg), "teacher": state, "student": state})
    return path


def image_folder(root, per_class):
    """An ImageFolder tree of digit PNGs: train/<c>/ and val/<c>/, and one corrupt file."""
    digits = DigitsDataset("all")
    counts = {}
    for i in range(len(digits)):
        img, label = digits.load(i)
        split = "train" if counts.get(label, 0) < per_class else "val"
        if counts.get(label, 0) >= per_class + per_class // 2:
            continue
        counts[label] = counts.get(label, 0) + 1
        (root / split / str(label)).mkdir(parents=True, exist_ok=True)
        img.save(root / split / str(label) / f"{i}.png")
    (root / "train" / "0" / "corrupt.png").write_bytes(b"not a png")
    return root


def test_cmd_linear_on_an_image_folder(tmp_path, capsys):
    cfg = build_config("demo")
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt.pth", cfg, random_init_backbone(cfg))
    data = image_folder(tmp_path / "digits", per_class=6)
    assert cmd_linear(["--checkpoint", str(ckpt), "--which", "student", "--data", str(data),
                       "--epochs", "5", "--lrs", "0.1", "1", "--batch-size", "16",
                       "eval.knn_k=5,10"]) == 0
    out = capsys.readouterr().out
    assert "60 train / 30 held-out images" in out  # the corrupt file is skipped
    assert "CLS of the last 4 blocks, standardised, dim 512" in out
    assert out.count("<- best") == 1 and "linear top-1:" in out
    assert "k-NN top-1 (same backbone, last CLS): k=5:" in out

    with pytest.raises(UserError, match="--checkpoint"):
        cmd_linear([])
    with pytest.raises(UserError, match="n-blocks"):
        cmd_linear(["--checkpoint", str(ckpt), "--data", str(data), "--n-blocks", "9"])


WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.nn.functional as F
    from ibot_fast import UserError, dist
    from ibot_fast.config import build_config
    from ibot_fast.data.datasets import DigitsDataset
    from ibot_fast.eval import features
    from ibot_fast.eval.knn import knn_classify, knn_eval_backbone, random_init_backbone
    from ibot_fast.eval.linear import extract_features

    torch.set_num_threads(1)
    rank, world, device = dist.init("cpu")
    source = DigitsDataset("test")
    source.targets, source.images = source.targets[:45], source.images[:45]
    backbone = random_init_backbone(build_config("demo"), seed=3)
    f, y = extract_features(backbone, source, 32, device, 2, True, batch_size=8)
    features.GATHER_PIECE_BYTES = 1  # one row per all-gather: the pieces' bookkeeping
    f1, y1 = extract_features(backbone, source, 32, device, 2, True, batch_size=8)
    features.GATHER_PIECE_BYTES = 3 * 1536 * 2  # 3 rows a piece (3 x 128 fp32), 2 ranks
    f2, y2 = extract_features(backbone, source, 32, device, 2, True, batch_size=8)
    # a process whose shard is all unreadable makes as many all-gathers as the other
    empty = features._all_gather_rows(torch.arange(0 if rank else 10), [torch.randn(
        0 if rank else 10, 384)], device)
    assert torch.equal(empty[0], torch.arange(10)) and empty[1][0].shape == (10, 384)
    own, own_y = extract_features(backbone, source, 32, device, 2, True, batch_size=8,
                                  gather=False)
    names = [dist.store_gather(f"r{rank}-{i}") for i in range(2)]  # the shared-GPU check's

    # k-NN with each process searching its shard of the training rows
    g = torch.Generator().manual_seed(0)
    train_f, test_f = F.normalize(torch.randn(101, 16, generator=g), dim=-1), \
        F.normalize(torch.randn(40, 16, generator=g), dim=-1)
    train_y, test_y = torch.randint(0, 5, (101,), generator=g), \
        torch.randint(0, 5, (40,), generator=g)
    knn = knn_classify(train_f[rank::world], train_y[rank::world], test_f, test_y,
                       (1, 7, 20, 60, 250), 0.07, chunk=8, block=5, sharded=True)
    digits_knn = knn_eval_backbone(build_config("demo"), backbone, device, source, source)

    try:  # a dataset that differs between processes: a one-line error on both
        source.targets, source.images = source.targets[:45 - rank], source.images[:45 - rank]
        extract_features(backbone, source, 32, device, 1, False)
        differs = None
    except UserError as e:
        differs = str(e)
    torch.save((world, f, y, f1, y1, f2, y2, own, own_y, names, knn, digits_knn, differs),
               f"{sys.argv[1]}/rank{rank}.pt")
    dist.end(0)
""")


def test_ddp_extraction_shards_and_gathers(tmp_path):
    """Two gloo processes each extract half of 45 images (23 + 22); both get all 45
    features, in the source's order, as one process computes them, whatever the size of
    the all-gather's pieces; with gather=False each keeps its own shard. The k-NN with
    each process searching its shard of the training rows equals one process's search
    over all of them; a dataset that differs between the processes is refused on both."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    source = DigitsDataset("test")
    source.targets, source.images = source.targets[:45], source.images[:45]
    backbone = random_init_backbone(build_config("demo"), seed=3)
    f, y = extract_features(backbone, source, 32, torch.device("cpu"), 2, True, batch_size=8)
    g = torch.Generator().manual_seed(0)
    train_f, test_f = F.normalize(torch.randn(101, 16, generator=g), dim=-1), \
        F.normalize(torch.randn(40, 16, generator=g), dim=-1)
    train_y, test_y = torch.randint(0, 5, (101,), generator=g), \
        torch.randint(0, 5, (40,), generator=g)
    knn = knn_classify(train_f, train_y, test_f, test_y, (1, 7, 20, 60, 250), 0.07)
    assert 0 < knn[20] < 100
    digits_knn = knn_eval_backbone(build_config("demo"), backbone, torch.device("cpu"),
                                   source, source)
    assert digits_knn[10] > 20  # the same images: a non-trivial score to agree on
    for rank in range(2):
        world, *gathered, own, own_y, names, knn_r, digits_r, differs = \
            torch.load(tmp_path / f"rank{rank}.pt")
        assert world == 2 and names == [["r0-0", "r1-0"], ["r0-1", "r1-1"]]
        for fr, yr in zip(gathered[::2], gathered[1::2]):
            assert torch.equal(yr, y)
            torch.testing.assert_close(fr, f, rtol=1e-5, atol=1e-5)
        assert torch.equal(own_y, y[rank::2])
        torch.testing.assert_close(own, f[rank::2], rtol=1e-5, atol=1e-5)
        assert knn_r == knn
        assert digits_r == pytest.approx(digits_knn, abs=1e-9)
        assert differs == ("the evaluation dataset differs between processes ([45, 44] images "
                           "on ranks 0..): every node must see the same files")
