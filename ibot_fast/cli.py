"""The `ibot-fast` command.

    ibot-fast train [--preset P] [--config FILE.yaml] [--data PATH] [--output-dir DIR]
                    [--resume] [key=value ...]
    torchrun --nproc_per_node=8 -m ibot_fast.train --preset vit_small_16_paper --data PATH
    ibot-fast knn --checkpoint runs/demo/checkpoint.pth [--which teacher|student]
    ibot-fast linear --checkpoint CKPT [--lrs ...] [--epochs N]    linear probe, many lrs at once
    ibot-fast export --checkpoint CKPT --out vits16.safetensors    backbone with timm's names
    ibot-fast show attention --checkpoint CKPT --image IMG --out PNG
    ibot-fast show curves --run DIR --out PNG
    ibot-fast demo                 pre-train on the embedded digits, then k-NN vs random init
    ibot-fast keys [--preset P] [--config FILE.yaml] [--yaml] [key=value ...]
                                   every config key with its value (--yaml: as a commented
                                   YAML file that --config reads back)
    ibot-fast bench [args]         benchmarks.bench_train (from a source checkout)

Errors a user can cause print one line (`ibot-fast: error: ...`) and exit with status 2.
"""
import argparse
import shlex
import sys
import time

from . import UserError, print_error


def cmd_train(argv):
    from .train import main as train_main

    return train_main(argv)


def cmd_knn(argv):
    p = argparse.ArgumentParser("ibot-fast knn", description="weighted k-NN on frozen "
                                "backbone features (teacher CLS, T=0.07)")
    from . import dist
    from .eval.knn import add_backbone_args, backbone_from_args, format_results, \
        knn_eval_backbone, on_device

    add_backbone_args(p, "evaluate")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    cfg, backbone, what = backbone_from_args(args, "knn")
    _, _, device = dist.init("auto")  # under torchrun, each process extracts a shard
    results = knn_eval_backbone(cfg, on_device(backbone, device), device)
    if dist.is_main():
        print(f"k-NN top-1 ({what}): {format_results(results)}")
    return 0  # the group is ended by main (dist.end)


def cmd_demo(argv):
    p = argparse.ArgumentParser("ibot-fast demo", description="pre-train the demo ViT on "
                                "the embedded digits, then compare k-NN with random init")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="keys from a YAML file, on top of the demo preset")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    from . import dist
    from .config import build_config
    from .eval.knn import format_results, knn_eval_backbone, on_device, \
        random_init_backbone
    from .train import Trainer

    cfg = build_config("demo", [f"train.output_dir={args.output_dir}"] + args.overrides,
                       args.config)
    _, _, device = dist.init(cfg.train.device)  # under torchrun: one GPU per process
    start = time.time()
    random_acc = knn_eval_backbone(cfg, on_device(random_init_backbone(cfg), device), device)
    trainer = Trainer(cfg, resume=None)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    if result["status"] in ("preempted", "requeued"):  # a signal: saved, not finished
        if dist.is_main():
            again = shlex.join(["--output-dir", args.output_dir, *args.overrides])
            print(f"\ndemo training {result['status']} at epoch {result['epoch']}: go on "
                  f"with `ibot-fast train --preset demo {again} --resume`, then "
                  f"`ibot-fast knn --checkpoint {args.output_dir}/checkpoint.pth`")
        return 0
    # every process extracts its shard of the images (gathered under FSDP)
    trained_acc = knn_eval_backbone(cfg, trainer.whole_teacher_backbone(everywhere=True),
                                    device)
    if not dist.is_main():
        return 0
    minutes = (time.time() - start) / 60
    print()
    print(f"digits k-NN top-1 on the 360 held-out images ({minutes:.1f} min, {device}):")
    print(f"  random init       {format_results(random_acc)}")
    print(f"  iBOT teacher      {format_results(trained_acc)}")
    print(f"checkpoint: {args.output_dir}/checkpoint.pth   log: {args.output_dir}/log.jsonl")
    if cfg.data.source == "digits":
        print(f"pictures:   {' '.join(str(p) for p in demo_pictures(cfg, args.output_dir))}")
    return 0


def demo_pictures(cfg, output_dir) -> list:
    """The demo run's training curves, and the teacher's CLS attention over a held-out
    digit (the image is written beside it): three files in output_dir."""
    from pathlib import Path

    from .data.datasets import build_dataset
    from .show import show_attention, show_curves

    out = Path(output_dir)
    image, _ = build_dataset(cfg, "test").load(0)
    image.save(out / "digit.png")
    return [show_curves(out, out / "curves.png"),
            show_attention(out / "checkpoint.pth", out / "digit.png", out / "attention.png"),
            out / "digit.png"]


def cmd_keys(argv):
    p = argparse.ArgumentParser("ibot-fast keys", description="every config key with its "
                                "value; --yaml: as a commented YAML file for --config")
    p.add_argument("--preset", default=None)
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="keys from a YAML file (after the preset, before the overrides)")
    p.add_argument("--yaml", action="store_true",
                   help="print a complete, commented YAML file that --config reads back")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    from .config import all_keys, build_config, get_key, to_yaml

    # a file of keys to fill in: a folder source may still lack its path
    cfg = build_config(args.preset, args.overrides, args.config, need_data=False)
    if args.yaml:
        made = shlex.join(["ibot-fast", "keys", *argv])
        print(to_yaml(cfg, header=[
            f"ibot_fast config: every key, written by `{made}`.",
            "Train with it: ibot-fast train --config THIS.yaml [key=value ...]",
            "Precedence: defaults < --preset < --config < key=value on the command line.",
        ]), end="")
        return 0
    for key in all_keys(cfg):
        print(f"{key}={get_key(cfg, key)}")
    return 0


def cmd_bench(argv):
    try:
        from benchmarks.bench_train import main as bench_main
    except ImportError:
        raise UserError("ibot-fast bench runs from a source checkout (the benchmarks/ "
                        "folder): cd into the repository first") from None
    return bench_main(argv)


def cmd_linear(argv):
    from .eval.linear import cmd_linear as run

    return run(argv)


def cmd_export(argv):
    from .export import cmd_export as run

    return run(argv)


def cmd_show(argv):
    from .show import cmd_show as run

    return run(argv)


COMMANDS = {"train": cmd_train, "knn": cmd_knn, "linear": cmd_linear, "export": cmd_export,
            "show": cmd_show, "demo": cmd_demo, "keys": cmd_keys, "bench": cmd_bench}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    from . import dist

    try:
        code = COMMANDS[argv[0]](argv[1:]) or 0
    except UserError as e:
        print_error(e)
        code = 2
    except BaseException:
        dist.destroy()
        raise
    return dist.end(code)  # under torchrun: the process ends here (dist.end says why)


if __name__ == "__main__":
    sys.exit(main())
