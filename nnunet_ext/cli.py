"""``nnunet-ext``: one thin command over the library; every subcommand maps to one function."""

import argparse
import json
import os
import shlex
import sys
from importlib import import_module
from pathlib import Path

from nnunet_ext import __version__
from nnunet_ext.errors import Terminated, UserError, os_error_message, sigterm_raises
from nnunet_ext.nnunet_paths import EXT_TRAINER_VAR, NNUNET_FOLDERS, ext_trainer_value, raw_output_folder


def _env(args) -> None:
    lines = []
    if args.root is not None:
        root = Path(args.root).expanduser().resolve()
        lines += [f"export {var}={shlex.quote(str(root / var))}" for var in NNUNET_FOLDERS]
    lines.append(f"export {EXT_TRAINER_VAR}={shlex.quote(ext_trainer_value(os.environ.get(EXT_TRAINER_VAR)))}")
    print("\n".join(lines))


def _synth(args) -> None:
    from nnunet_ext.datasets.synth import write_synthetic_dataset

    raw_dir = raw_output_folder(args.out)
    every, n_slices = (None, args.slices) if args.slices is not None else (args.every, None)
    folder = write_synthetic_dataset(raw_dir, args.dataset_id, name=args.name, num_cases=args.cases,
                                     num_test_cases=args.test_cases, shape=tuple(args.size),
                                     spacing=tuple(args.spacing), axis=args.axis, every=every,
                                     n_slices=n_slices, seed=args.seed)
    print(f"wrote {folder}")


def _plans_tiny(args) -> None:
    from nnunet_ext.plans import derive_tiny_plans

    path = derive_tiny_plans(args.dataset, source=args.plans, target=args.name)
    print(f"wrote {path}\ntrain with: nnUNetv2_train {args.dataset} 3d_fullres FOLD -p {path.stem} -device cpu")


def _plans_attention(args) -> None:
    from nnunet_ext.plans import attention_feature_maps, derive_attention_plans, resolve_configuration

    path = derive_attention_plans(args.dataset, source=args.plans, target=args.name, stages=args.stages,
                                  heads=args.heads, gates=args.gates)
    plans = json.loads(path.read_text())
    print(f"wrote {path}")
    for name in plans["configurations"]:
        configuration = resolve_configuration(plans, name)
        maps = ", ".join(f"{channels} x {'x'.join(map(str, size))}"
                         for channels, size in attention_feature_maps(configuration, args.stages))
        print(f"  {name}: axial attention ({args.heads} heads) on {maps or 'no stage'}"
              f"{'; attention gates on every skip' if args.gates else ''}")
    print(f"train with: nnUNetv2_train {args.dataset} CONFIGURATION FOLD -p {path.stem} [-tr TRAINER]")


def _demo(args) -> None:
    from nnunet_ext.benchmarking.demo import run_demo

    run_demo(Path(args.out), device=args.device)


def _add_convert(commands) -> None:
    from nnunet_ext.dataset_conversion import fibsem, fucci, lsfm, selma3d

    convert = commands.add_parser("convert", help=LAZY_COMMANDS["convert"])
    sources = convert.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for module in (lsfm, fibsem, selma3d, fucci):
        module.register_cli(sources)


def _add_benchmark(commands) -> None:
    from nnunet_ext.benchmarking import accuracy, annotation_loop, speed

    runs = commands.add_parser("benchmark", help=LAZY_COMMANDS["benchmark"],
                               description="Train, predict and score trainers against stock nnU-Net over sparsity "
                               "levels and seeds; `nnunet-ext benchmark speed -h` for the speed benchmark, "
                               "`nnunet-ext benchmark converge -h` for the budget at which stock nnU-Net converges, "
                               "`nnunet-ext benchmark annotate -h` for the simulated annotation loop.")
    accuracy.add_arguments(runs)
    modes = runs.add_subparsers(dest="mode", metavar="{speed,converge,annotate}")
    speed.register_cli(modes)
    accuracy.register_converge_cli(modes)
    annotation_loop.register_cli(modes)


def _module_cli(module: str):
    """The ``register_cli`` of ``module``, imported when called."""
    return lambda commands: import_module(module).register_cli(commands)


# Commands whose modules import torch, nnU-Net or the converters' dependencies: `nnunet-ext -h` lists them from
# this table, and only the command that runs imports its module (`env` runs in shell start-up files).
LAZY_COMMANDS = {
    "convert": "convert microscopy exports into an nnU-Net raw dataset",
    "sparsify": "simulate sparse slice annotation from a dense nnU-Net raw dataset",
    "instances": "numbered nuclei (label TIFFs) from predicted border/interior segmentations",
    "pseudolabels": "pseudo-label a fold's training cases with a trained model (e.g. 2d) in the preprocessed "
                    "geometry of another configuration (e.g. 3d_fullres), for PseudoLabelWeightedTrainer",
    "evaluate": "score predicted segmentations against dense ground truth (Dice, 2D Dice, clDice, Betti, ...)",
    "suggest": "suggest which unannotated slices to annotate next, ranked by a trained model's uncertainty",
    "benchmark": "trainers against stock nnU-Net on the same sparse labels "
                 "(`benchmark speed`: step time and memory; `benchmark converge`: budgets; "
                 "`benchmark annotate`: suggested vs evenly spaced slices)",
}
LAZY_REGISTER = {
    "convert": _add_convert,
    "sparsify": _module_cli("nnunet_ext.datasets.sparsify"),
    "instances": _module_cli("nnunet_ext.datasets.instances"),
    "pseudolabels": _module_cli("nnunet_ext.pseudo_label_generation"),
    "evaluate": _module_cli("nnunet_ext.evaluation"),
    "suggest": _module_cli("nnunet_ext.suggest"),
    "benchmark": _add_benchmark,
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``nnunet-ext``, complete for ``command`` (every command when None); the other lazy commands
    are listed by name and help only."""
    parser = argparse.ArgumentParser(prog="nnunet-ext", description="nnU-Net v2 extensions for sparsely annotated 3D "
                                     "microscopy: run nnU-Net's own commands with our trainers (see README).")
    parser.add_argument("--version", action="version", version=f"nnunet-ext {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    env = commands.add_parser("env", help="print the export lines nnU-Net needs to find our trainers")
    env.add_argument("--root", help="also print nnUNet_raw/_preprocessed/_results exports for folders under ROOT")
    env.set_defaults(func=_env)

    synth = commands.add_parser("synth", help="write a synthetic sparsely annotated microscopy dataset")
    synth.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    synth.add_argument("--name", default="SynthMicroscopy", help="dataset name (DatasetXXX_<name>)")
    synth.add_argument("--out", help="raw folder to write into (default: $nnUNet_raw)")
    synth.add_argument("--cases", type=int, default=6, help="training cases")
    synth.add_argument("--test-cases", type=int, default=2, help="test cases (imagesTs + dense labelsTs)")
    synth.add_argument("--size", type=int, nargs=3, default=(24, 64, 64), metavar=("Z", "Y", "X"))
    synth.add_argument("--spacing", type=float, nargs=3, default=(4.0, 1.0, 1.0), metavar=("Z", "Y", "X"))
    synth.add_argument("--axis", type=int, default=0, help="annotation axis in (z, y, x) order")
    sparsity = synth.add_mutually_exclusive_group()
    sparsity.add_argument("--every", type=int, default=4, help="annotate every k-th slice (default 4)")
    sparsity.add_argument("--slices", type=int, help="annotate N evenly spaced slices instead")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_synth)

    plans = commands.add_parser("plans", help="derive a plans variant from the auto-configured plans")
    variants = plans.add_subparsers(dest="variant", required=True, metavar="VARIANT")
    tiny = variants.add_parser("tiny", help="CPU-sized network and patch on the same preprocessed data")
    tiny.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    tiny.add_argument("-p", "--plans", default="nnUNetPlans", help="source plans identifier")
    tiny.add_argument("-o", "--name", default="nnUNetPlans_tiny", help="name of the new plans variant")
    tiny.set_defaults(func=_plans_tiny)
    attention = variants.add_parser("attention", help="axial attention in the deepest decoder stages (optionally "
                                    "attention gates on the skips), same preprocessed data")
    attention.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    attention.add_argument("-p", "--plans", default="nnUNetPlans", help="source plans identifier (nnUNetPlans, "
                           "a ResEnc preset, or a variant of them such as nnUNetPlans_tiny)")
    attention.add_argument("-o", "--name", help="name of the new plans variant (default: <source>_axialattn)")
    attention.add_argument("--stages", type=int, default=2,
                           help="decoder stages with axial attention, counted from the deepest (default 2)")
    attention.add_argument("--heads", type=int, default=4, help="attention heads per block (default 4)")
    attention.add_argument("--gates", action="store_true", help="add attention gates on the skip connections")
    attention.set_defaults(func=_plans_attention)

    for name, register in LAZY_REGISTER.items():
        if command in (None, name):
            register(commands)
        else:
            commands.add_parser(name, help=LAZY_COMMANDS[name])

    demo = commands.add_parser("demo", help="synth -> preprocess -> train -> predict -> Dice, on CPU")
    demo.add_argument("--out", default="nnunet_ext_demo", help="output folder (default: ./nnunet_ext_demo)")
    demo.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in LAZY_COMMANDS else ""  # "": no lazy module to import
    args = build_parser(command).parse_args(argv)
    try:
        with sigterm_raises():  # a scheduler's SIGTERM then cleans up like any error
            args.func(args)
    except UserError as error:
        print(f"nnunet-ext: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # unwritable or full output folder: the writers have cleaned up already
        print(f"nnunet-ext: error: {os_error_message(error)}", file=sys.stderr)
        return 2
    except Terminated as stop:
        print("nnunet-ext: error: terminated (SIGTERM); unfinished output was removed", file=sys.stderr)
        return stop.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
