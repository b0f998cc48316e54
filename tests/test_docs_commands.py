"""Executable documentation: every shell command of ``README.md`` and ``docs/*.md`` (fenced ``bash``
blocks) runs as written, on tiny data made here, and writes what the docs say it writes.

A command is one line of a ``bash`` block (``\\`` continues it; ``#`` starts a comment). The commands
of a page run in page order in one working directory that looks like the repository root
(``configs/``, ``accelerate_configs/``, ``ds_configs/`` and the two scripts are linked there), so a
later command finds what an earlier one wrote (``runs/vits16``, ``plans/vitb16``); selecting one
command with ``-k`` runs the earlier ones of its page first.

The substitution table (also in docs/training.md, "The documented commands are tested"):

=================================================  ======================================================
documented                                         run here as
=================================================  ======================================================
``/data/imagenet/train``, ``/data/imagenet/val``   generated labelled image folders (2 classes, 24 px)
``/data/imagenet-shards/{train,val}``              those folders written as shards (4 images a shard)
``shard-{000000..001281}.tar``                     ``shard-{000000..000003}.tar`` (the shards there are)
``data.samples_per_epoch=1281167``                 ``data.samples_per_epoch=16`` (the images there are)
``s3://bucket/...``, ``s3://my-bucket/...``        a moto S3 server (``S3_ENDPOINT_URL``), the shards above
                                                   uploaded under ``imagenet/`` and ``imagenet-shards/``
``/weights/...`` teacher files                     tiny teachers written in the documented layout
``/shared/runs/...``                               ``shared/runs/...`` in the working directory
``/scratch/...`` (a staging directory)             ``scratch/...`` in the working directory
``--config_file accelerate_configs/gpu_8_ddp.yaml``,  ``accelerate_configs/cpu_2proc.yaml`` (2 gloo ranks)
``multinode_2x8_*.yaml`` (+ its machine/IP flags)
``gpu_8_zero{1,2,3}.yaml``                         ``--use_deepspeed --deepspeed_config_file
                                                   ds_configs/zeroN.json --num_processes 2`` (CPU)
``--num_processes 4`` / ``8``                      ``--num_processes 2`` with ``cpu_2proc.yaml``
``selfdistill-plan --gpus 8 --global-batch 1024``  ``--cpu --gpus 2 --global-batch 16``
``--workers 16``, ``--samples-per-shard 1000``      ``--workers 2``, ``--samples-per-shard 4``
``train.trackers=[wandb,mlflow]``                  offline (``WANDB_MODE=offline``, MLflow to a local file store)
``sbatch ...``                                     skipped here: tests/test_slurm_cluster.py runs them on a
                                                   real two-node SLURM cluster
``W``, ``TRAIN``, ``VAL``, ``IMG_OR_DIR``            ``runs/vits16`` (README's run), the image folders, a
(docs/evaluation.md)                               class folder; fine-tuning's ``W``: the FD CLIP run's
                                                   student export
``/data/roxford5k``, ``rparis6k``, ``copydays``,    toy sets of that layout (a ``gnd_*.pkl`` beside
``yfcc_20k``, ``yfcc_10k``                         ``jpg/``; Copydays' blocks), a few random images each
``run_eval.py`` sub-commands                       ``--image-size 16``, linear: 2 epochs of batch 8 and
                                                   ``--n-last-blocks`` at most 2 (the tiny ViT has 2)
every training / planning command                  + model-size overrides for its network (a 2-block
                                                   ViT, Swin or ResNet at 16-64 px, small heads), 2
                                                   epochs of 16 images, fp32, no loader workers
=================================================  ======================================================

A line preceded by ``# not run in tests: REASON`` in its block is collected and skipped with that
reason. ``make ...`` lines are not collected (``make demo`` and ``make test`` have their own tests;
``make install`` builds the environment these tests run in).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_image_folder
from s3_server import VENV_BIN, s3_server  # noqa: F401 - fixture

pytestmark = pytest.mark.docs
ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = "# not run in tests:"
LINKED = ["configs", "accelerate_configs", "ds_configs", "run_pretrain.py", "run_eval.py"]
N_SHARDS, N_TRAIN = 4, 16


@dataclass
class Command:
    page: str  # relative to the repository root
    line: int  # of the command's first line
    text: str  # as documented, continuation lines joined
    skip: str = ""  # the reason given by a `# not run in tests:` line

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def collect(pages: list[Path] = PAGES) -> list[Command]:
    """Every command of every ``bash`` block, in page order."""
    commands = []
    for page in pages:
        lines = page.read_text().splitlines()
        in_bash, skip, start, parts = False, "", 0, []
        for number, line in enumerate(lines, 1):
            stripped = line.strip()
            if stripped.startswith("```"):
                in_bash = stripped == "```bash" and not in_bash
                skip = ""
                continue
            if not in_bash:
                continue
            if not parts:
                if stripped.startswith(MARK):
                    skip = stripped[len(MARK):].strip()
                if not stripped or stripped.startswith("#"):
                    continue
                start = number
            parts.append(line.rstrip().removesuffix("\\").strip())
            if not line.rstrip().endswith("\\"):
                text = " ".join(parts)
                parts = []
                if not text.startswith("make "):
                    commands.append(Command(str(page.relative_to(ROOT)), start, text, skip))
                skip = ""
    return commands


COMMANDS = collect()


# -- the workspace: tiny data, teachers, an S3 server ---------------------------------------------------


def _write_shards(images: Path, out: Path, *options: str) -> Path:
    """Shards as docs/data.md's lines write them (so that re-running those lines finds them done)."""
    from selfdistill.cli.shards import main as shards

    assert shards(["write", "--folder", str(images), "--out", str(out), "--resize-shorter", "256", *options,
                   "--no-progress"]) == 0
    return out


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _teachers(root: Path) -> None:
    """The documented teacher files, tiny, each in its documented layout."""
    import timm
    from test_fd import _fmt_cases

    made = {fmt if fmt != "dino" or "checkpoint" not in path.name else "dino_full": path
            for fmt, _, _, path, _ in _fmt_cases(_made(root / "fd"))}
    for fmt, name in [("openai_clip", "clip_vit_b16_state_dict.pt"), ("dino", "dino_vitbase16_pretrain.pth"),
                      ("deit", "deit_base_patch16_224-b5f2ef4d.pth"), ("esvit", "esvit_swin_base_w14/checkpoint_best.pth")]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(made[fmt], root / name)
    torch.manual_seed(0)  # SimSiam's released checkpoint: the ResNet-50 under module.encoder.
    resnet = timm.create_model("resnet50", num_classes=0, **TINY_RESNET)
    (root / "simsiam").mkdir()
    torch.save({"epoch": 100, "arch": "resnet50",
                "state_dict": {f"module.encoder.{k}": v for k, v in resnet.state_dict().items()}},
               root / "simsiam" / "checkpoint_0099.pth.tar")


def _retrieval_sets(data: Path) -> None:
    """Revisited-Oxford/Paris-shaped sets (``gnd_*.pkl`` beside ``jpg/``) and Copydays with YFCC
    distractor / whitening folders, a few random images each."""
    import pickle

    import numpy as np
    from PIL import Image
    from test_copydetect import _copydays

    rng = np.random.default_rng(0)
    for name in ("roxford5k", "rparis6k"):
        jpg = data / name / "jpg"
        jpg.mkdir(parents=True)
        for i in range(5):
            Image.fromarray((rng.random((36, 44, 3)) * 255).astype(np.uint8)).save(jpg / f"db{i}.jpg")
        shutil.copy(jpg / "db1.jpg", jpg / "q0.jpg")
        gnd = {"imlist": [f"db{i}" for i in range(5)], "qimlist": ["q0"],
               "gnd": [{"bbx": [0, 0, 44, 36], "easy": [1], "hard": [], "junk": []}]}
        (data / name / f"gnd_{name}.pkl").write_bytes(pickle.dumps(gnd))
    root = _copydays(data / "copydays", rng)
    shutil.move(str(root / "whitening"), data / "yfcc_20k")
    shutil.move(str(root / "distractors"), data / "yfcc_10k")


@dataclass
class Workspace:
    root: Path
    env: dict[str, str]
    done: dict[str, subprocess.CompletedProcess] = field(default_factory=dict)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, s3_server) -> Workspace:  # noqa: F811
    root = tmp_path_factory.mktemp("docs")
    for name in LINKED:
        (root / name).symlink_to(ROOT / name)
    data = root / "data"
    train = make_image_folder(data / "imagenet" / "train", n_per_class=N_TRAIN // 2)
    val = make_image_folder(data / "imagenet" / "val", n_per_class=4, seed=1)
    shards = {"train": _write_shards(train, data / "imagenet-shards" / "train", "--samples-per-shard", "4"),
              "val": _write_shards(val, data / "imagenet-shards" / "val", "--no-shuffle")}
    assert len(list(shards["train"].glob("*.tar"))) == N_SHARDS
    shutil.copytree(shards["train"], root / "shards" / "train")  # what data.md's s5cmd line uploads
    _teachers(data / "weights")
    _retrieval_sets(data)
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1",
               S3_ENDPOINT_URL=s3_server, AWS_ENDPOINT_URL=s3_server, AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               AWS_CONFIG_FILE=str(root / "no-aws-config"), AWS_SHARED_CREDENTIALS_FILE=str(root / "no-aws-creds"),
               AWS_EC2_METADATA_DISABLED="true", WANDB_MODE="offline", WANDB_SILENT="true",
               WANDB_DIR=str(root / "wandb"), MLFLOW_TRACKING_URI=f"file://{root / 'mlruns'}", MLFLOW_ALLOW_FILE_STORE="true",
               HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    env.pop("WORLD_SIZE", None)
    s5 = [str(VENV_BIN / "s5cmd"), "--endpoint-url", s3_server]
    for bucket, prefix in (("bucket", "imagenet"), ("my-bucket", "imagenet-shards")):
        subprocess.run([*s5, "mb", f"s3://{bucket}"], check=True, capture_output=True, env=env)
        for split in ("train", "val"):
            subprocess.run([*s5, "cp", f"{shards[split]}/*", f"s3://{bucket}/{prefix}/{split}/"], check=True,
                           capture_output=True, env=env)
    return Workspace(root, env)


# -- the substitutions -----------------------------------------------------------------------------------

TINY_VIT = {"model.img_size": "16", "model.patch_size": "4", "model.kwargs": "{depth: 2, embed_dim: 32, num_heads: 2}",
            "data.global_crop_size": "16", "data.local_crop_size": "8", "knn.image_size": "16"}
TINY_SWIN = {"model.img_size": "64", "model.patch_size": "null",
             "model.kwargs": "{depths: [1, 1, 1, 1], embed_dim: 24, num_heads: [1, 1, 1, 1], window_size: 2}",
             "data.global_crop_size": "64", "data.local_crop_size": "64", "knn.image_size": "64"}
TINY_RESNET = {"layers": [1, 1, 1, 1], "channels": [8, 16, 16, 32], "stem_width": 8}
TINY_CNN = {"model.img_size": "null", "model.patch_size": "null", "data.global_crop_size": "16",
            "data.local_crop_size": "8", "knn.image_size": "16"}
RUN = {"train.epochs": "2", "train.batch_size_per_device": "8", "train.precision": "fp32", "train.log_every": "1",
       "train.checkpoint_every": "1000", "train.progress_bar": "false", "data.num_workers": "0",
       "data.n_local_crops": "2", "data.shuffle_buffer": "8", "optim.warmup_epochs": "1", "knn.k": "[1, 3]",
       "knn.every_epochs": "1", "knn.max_train_samples": "0"}
HEADS = {"dino": {"method.out_dim": "64", "method.head_hidden_dim": "32", "method.head_bottleneck_dim": "16",
                  "method.warmup_teacher_temp_epochs": "1"},
         "simsiam": {"method.proj_dim": "32", "method.pred_dim": "8"},
         "smd": {"method.teacher_kwargs": "{layers: [1, 1, 1, 1], channels: [8, 16, 16, 32], stem_width: 8}",
                 "method.teacher_dim": "0"}}
HEADS["glsd"] = HEADS["patchwise_dino"] = HEADS["dino"]
FD_TEACHER = {"vit": "{img_size: 16, patch_size: 4, depth: 2, embed_dim: 48, num_heads: 2}",
              "swin": "{img_size: 64, depths: [2, 1, 1, 1], embed_dim: 16, num_heads: [1, 1, 1, 1], window_size: 2}"}
LAUNCHERS = {"gpu_8_ddp.yaml": ["--config_file", "accelerate_configs/cpu_2proc.yaml"],
             "multinode_2x8_c10d.yaml": ["--config_file", "accelerate_configs/cpu_2proc.yaml"]}
for _stage in (1, 2, 3):
    LAUNCHERS[f"gpu_8_zero{_stage}.yaml"] = ["--use_deepspeed", "--deepspeed_config_file",
                                            f"ds_configs/zero{_stage}.json", "--num_processes", "2"]
LAUNCHERS["multinode_2x8_zero2.yaml"] = LAUNCHERS["gpu_8_zero2.yaml"]
MULTINODE_FLAGS = {"--machine_rank", "--main_process_ip", "--main_process_port", "--num_machines"}
CPU_2PROC = ["--config_file", "accelerate_configs/cpu_2proc.yaml"]


def _paths(token: str, ws: Path) -> str:
    token = token.replace("/data/", f"{ws}/data/").replace("/weights/", f"{ws}/data/weights/")
    token = token.replace("/shared/runs/", f"{ws}/shared/runs/")
    token = token.replace("/scratch/", f"{ws}/scratch/")
    token = re.sub(r"\{000000\.\.\d{6}\}", "{000000..%06d}" % (N_SHARDS - 1), token)
    return re.sub(r"^(data\.samples_per_epoch)=\d+$", rf"\1={N_TRAIN}", token)


def _recipe(path: Path) -> dict:
    tree = yaml.safe_load(path.read_text()) or {}
    if "base" in tree:
        base = _recipe(path.parent / tree.pop("base"))
        for section, values in tree.items():
            base.setdefault(section, {}).update(values or {})
        return base
    return tree


def _flow(tree: dict) -> str:
    return yaml.safe_dump(tree, default_flow_style=True, width=1000).strip()


def _tiny(doc: dict[str, str], recipe: dict) -> dict[str, str]:
    """The model-size overrides for the network a command trains (the documented model name kept)."""
    method = doc.get("method.name", recipe.get("method", {}).get("name", "dino"))
    model = doc.get("model.name", recipe.get("model", {}).get("name", ""))
    sizes = (TINY_SWIN if model.startswith("swin") else TINY_VIT if model.startswith(("vit", "beit", "deit"))
             else TINY_CNN)
    tiny = {**RUN, **sizes, **HEADS.get(method, {})}
    if model.startswith("resnet"):
        tiny["model.kwargs"] = _flow(TINY_RESNET)
    if "model.kwargs" in tiny:  # the recipe's own kwargs (FD's BEiT flags) stay; only the size shrinks
        tiny["model.kwargs"] = _flow({**(recipe.get("model", {}).get("kwargs") or {}),
                                      **yaml.safe_load(tiny["model.kwargs"])})
    if method == "fd":
        teacher = recipe["method"].get("teacher_model", "")
        tiny["method.teacher_kwargs"] = FD_TEACHER["swin" if teacher.startswith("swin") else "vit"]
        tiny.pop("data.local_crop_size")
    if method in ("fd", "simsiam", "smd"):
        tiny.pop("data.n_local_crops")
    return tiny


def _with_overrides(args: list[str], ws: Path, entry: str) -> list[str]:
    """``args`` of ``run_pretrain.py`` / ``selfdistill-plan`` with the model-size overrides merged in
    (they replace documented values of the same keys, e.g. ``train.precision=bf16``)."""
    if "--print-config" in args:
        return args
    recipe = next((args[i + 1] for i, a in enumerate(args) if a == "--config"), "")
    if entry == "sbatch":  # the recipe is the script's first positional argument
        recipe = next(a for a in args if a.endswith(".yaml"))
    doc = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
    tiny = _tiny(doc, _recipe(ws / recipe))
    if entry == "train" and "data.path" not in doc:  # the recipe's /data/imagenet/train, substituted too
        tiny["data.path"] = _paths(_recipe(ws / recipe)["data"]["path"], ws)
    if entry == "plan":  # they reach the plan's overrides.txt, so launch.sh trains the tiny run too
        tiny = {k: v for k, v in tiny.items() if k != "train.batch_size_per_device"}  # the plan's to choose
    dotted = [i for i, a in enumerate(args) if "=" in a and not a.startswith("-")]
    at = dotted[-1] + 1 if dotted else len(args)  # argparse takes the overrides as one run of positionals
    kept = [a for a in args[:at] if not ("=" in a and not a.startswith("-") and a.split("=", 1)[0] in tiny)]
    return kept + [f"{k}={v}" for k, v in tiny.items()] + args[at:]


def localise(cmd: Command, ws: Workspace) -> tuple[list[str], dict[str, str], str]:
    """The command as it runs here: (argv, environment, what it is)."""
    tokens = shlex.split(cmd.text, comments=True)
    env = dict(ws.env)
    while tokens and re.match(r"^[A-Z][A-Z0-9_]*=", tokens[0]):  # VAR=value before the program
        name, value = tokens.pop(0).split("=", 1)
        if name not in ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):  # the moto server's stays
            env[name] = value
    fd_student = "--config" in tokens and "finetune" in tokens
    tokens = [_paths(_placeholder(t, fd_student), ws.root) for t in tokens]
    program, args = tokens[0], tokens[1:]
    if program == "sbatch":
        return [], env, "sbatch"
    if program == "python":
        program = sys.executable
    elif program in ("accelerate", "selfdistill-plan", "selfdistill-shards", "s5cmd", "hf"):
        program = str(VENV_BIN / program)
    if tokens[0] == "accelerate":
        launcher, i = [], 1  # args[0] is "launch"
        while i < len(args) and args[i].startswith("--"):
            flag = args[i]
            value = args[i + 1] if i + 1 < len(args) else ""
            if flag == "--config_file":
                launcher += LAUNCHERS.get(Path(value).name, [flag, value])
            elif flag == "--num_processes":
                launcher += [*CPU_2PROC, "--num_processes", "2"]
            elif flag not in MULTINODE_FLAGS:
                launcher += [flag, value]
            i += 2
        script, rest = args[i], args[i + 1:]
        if script == "run_eval.py":
            return [program, "launch", *launcher, script, *_eval_overrides(rest, ws.root)], env, "eval"
        return [program, "launch", *launcher, script, *_with_overrides(rest, ws.root, "train")], env, _what(script)
    if "run_eval.py" in args:
        at = args.index("run_eval.py")
        args = [*args[:at + 1], *_eval_overrides(args[at + 1:], ws.root)]
        if tokens[0] == "accelerate":
            return [program, *args], env, "eval"
        return [program, *args], env, "eval"
    if program == sys.executable and args and args[0] == "run_pretrain.py":
        return [program, args[0], *_with_overrides(args[1:], ws.root, "train")], env, "train"
    if tokens[0] == "selfdistill-plan":
        args = [a for a in args]
        for flag, value in (("--gpus", "2"), ("--global-batch", "16")):
            args[args.index(flag) + 1] = value
        return [program, "--cpu", *_with_overrides(args, ws.root, "plan")], env, "plan"
    for flag, value in (("--workers", "2"), ("--samples-per-shard", "4")):
        if tokens[0] == "selfdistill-shards" and flag in args:
            args[args.index(flag) + 1] = value
    if program.endswith("launch.sh"):
        return ["bash", program, *args], env, "train"
    return [program, *args], env, _what(args[0] if args else program)


PLACEHOLDERS = {"W": "runs/vits16", "TRAIN": "/data/imagenet/train", "VAL": "/data/imagenet/val",
                "IMG_OR_DIR": "/data/imagenet/val/a"}
FD_STUDENT = "runs/fd_clip_vit_base16/export/student_backbone.safetensors"  # W of fine-tuning: an FD student
EVAL_SIZES = {"--image-size": "16", "--n-last-blocks": "2", "--epochs": "2", "--batch-size": "8", "--num-workers": "0"}
EVAL_FLAGS = {"knn": ["--image-size", "--num-workers"], "retrieval": ["--image-size"],
              "linear": ["--image-size", "--epochs", "--batch-size", "--num-workers", "--n-last-blocks"],
              "copydetect": ["--image-size", "--batch-size", "--num-workers"]}
SUMMARY = {"linear.epochs": "2", "linear.batch_size": "8", "linear.image_size": "16", "linear.n_last_blocks": "2",
           "linear.num_workers": "0", "knn.image_size": "16", "knn.num_workers": "0"}
FINETUNE = {"data.input_size": "16", "model.patch_size": "4", "train.epochs": "1", "train.batch_size_per_device": "8",
            "train.progress_bar": "false", "train.log_every": "1", "eval.batch_size": "8", "data.num_workers": "0",
            "optim.warmup_epochs": "0", "train.precision": "fp32",
            "model.kwargs": "{depth: 2, embed_dim: 32, num_heads: 2}"}


def _placeholder(token: str, fd_student: bool = False) -> str:
    """A placeholder of docs/evaluation.md, alone or as an override's value (``data.path=TRAIN``)."""
    if token == "W" and fd_student:
        return FD_STUDENT
    key, eq, value = token.partition("=")
    if eq and value in PLACEHOLDERS:
        return f"{key}={PLACEHOLDERS[value]}"
    return PLACEHOLDERS.get(token, token)


def _eval_overrides(args: list[str], ws: Path) -> list[str]:
    """A ``run_eval.py`` sub-command's arguments at the tiny model's size: 16 px, 2 epochs of batch 8,
    no loader workers (documented values of those options replaced)."""
    command, rest = args[0], list(args[1:])
    for flag in EVAL_FLAGS.get(command, []):
        if flag in rest:
            rest[rest.index(flag) + 1] = EVAL_SIZES[flag]
        else:
            rest += [flag, EVAL_SIZES[flag]]
    if command == "summary":
        rest = [a for a in rest if a.split("=", 1)[0] not in SUMMARY] + [f"{k}={v}" for k, v in SUMMARY.items()]
    if command == "finetune":
        recipe = _recipe(ws / rest[rest.index("--config") + 1])
        tiny = {**FINETUNE, "model.kwargs": _flow({**(recipe["model"].get("kwargs") or {}),
                                                   **yaml.safe_load(FINETUNE["model.kwargs"])})}
        dotted = [i for i, a in enumerate(rest) if "=" in a and not a.startswith("-")]
        at = dotted[-1] + 1 if dotted else len(rest)
        rest = ([a for a in rest[:at] if a.split("=", 1)[0] not in tiny] + [f"{k}={v}" for k, v in tiny.items()]
                + rest[at:])
    return [command, *rest]


def _what(script: str) -> str:
    return {"run_pretrain.py": "train", "run_eval.py": "eval"}.get(script, "other")


def _argument(argv: list[str], key: str) -> str:
    for i, a in enumerate(argv):
        if a.startswith(f"{key}="):
            return a.split("=", 1)[1]
        if a == key and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def _writes(cmd: Command) -> set[str]:
    """The run or plan directory a documented line writes (relative to the working directory)."""
    tokens = shlex.split(cmd.text, comments=True)
    if "--write" in tokens:
        return {tokens[tokens.index("--write") + 1]}
    if "run_pretrain.py" not in tokens or "--print-config" in tokens:
        return set()
    out = _argument(tokens, "train.output_dir")
    return {out or _recipe(ROOT / _argument(tokens, "--config"))["train"]["output_dir"]}


def _reads(cmd: Command) -> set[str]:
    """The ``runs/`` and ``plans/`` directories a documented line reads."""
    tokens = shlex.split(cmd.text, comments=True)
    fd_student = "--config" in tokens and "finetune" in tokens
    found = set()
    for token in (_placeholder(t, fd_student) for t in tokens):
        path = token.split("=", 1)[-1]
        if path.startswith(("runs/", "plans/")) and not token.startswith("train.output_dir="):
            found.add("/".join(Path(path).parts[:2]))
    return found - _writes(cmd)


def _run_dir(argv: list[str], ws: Path) -> Path:
    out = _argument(argv, "train.output_dir")
    if not out:
        launch = next((a for a in argv if a.endswith("launch.sh")), "")
        if launch:
            planned = shlex.split(Path(launch).read_text().splitlines()[-1])
            recipe = planned[planned.index("--config") + 1]
        else:
            recipe = _argument(argv, "--config")
        out = _recipe(ws / recipe)["train"]["output_dir"]
    return ws / out


def _set_aside(run_dir: Path) -> None:
    """Lines that are alternatives (1 GPU, 8 GPUs, ZeRO-2, 2 nodes; linear heads for ViT-S, ViT-B,
    SMD; fine-tuning on 1 process or 8 GPUs) name one directory; each starts fresh here (``--resume auto``, or the linear head's own
    resume, would otherwise continue or refuse another line's run)."""
    if run_dir.exists():
        n = sum(1 for _ in run_dir.parent.glob(f"{run_dir.name}.earlier-*"))
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.earlier-{n}"))


def written(argv: list[str], kind: str, ws: Path, result: subprocess.CompletedProcess) -> list[Path]:
    """What the docs say the command writes (docs/training.md's run layout, docs/cluster.md's plan
    files, docs/data.md's shard directory, docs/evaluation.md's results)."""
    if kind == "train":
        if "--print-config" in argv:
            assert yaml.safe_load(result.stdout)["method"]["name"]  # the resolved recipe, as YAML
            return []
        run = _run_dir(argv, ws)
        return [run / "config.yaml", run / "log.jsonl", run / "provenance.json",
                run / "export" / ("teacher_backbone.safetensors" if (run / "export" / "teacher_backbone.safetensors").exists()
                                  else "student_backbone.safetensors")]
    if kind == "plan":
        plan = ws / _argument(argv, "--write")
        return [plan / "launch.sh", plan / "accelerate.yaml", plan / "overrides.txt"]
    if "selfdistill-shards" in argv[0] and argv[1] == "write":
        return [Path(_argument(argv, "--out")) / "_info.json"]
    if kind == "eval":
        command = argv[argv.index("run_eval.py") + 1]
        weights = ws / _argument(argv, "--weights")
        beside = weights if weights.is_dir() else weights.parent
        if command in ("knn", "linear", "retrieval", "copydetect"):
            return [beside / f"{command}_results.json"]
        if command == "summary":
            return [beside / "eval_summary" / "summary.json", beside / "eval_summary" / "summary.md"]
        if command == "pictures":
            return [beside / "pictures" / "index.html"]
        if command == "finetune":
            return [ws / _recipe(ws / _argument(argv, "--config"))["train"]["output_dir"] / "log.jsonl"]
    return []


def run(cmd: Command, ws: Workspace) -> subprocess.CompletedProcess:
    """Run ``cmd`` (after the earlier commands of its page) and check its exit status and outputs."""
    for needed in _reads(cmd):  # the earlier line of the page that writes it, when it has not run yet
        writers = [c for c in COMMANDS if not c.skip and c.id != cmd.id and needed in _writes(c)]
        writer = next((c for c in writers if c.page == cmd.page and c.line < cmd.line), writers[0] if writers else None)
        if writer is not None and writer.id not in ws.done:
            run(writer, ws)
    same = next((c for c in COMMANDS if c.id in ws.done and " ".join(c.text.split()) == " ".join(cmd.text.split())
                 and c.id != cmd.id), None)
    if same is not None:  # the same line on another page runs once
        assert ws.done[same.id].returncode == 0, f"{cmd.id}: failed as {same.id}"
        ws.done[cmd.id] = ws.done[same.id]
        return ws.done[cmd.id]
    argv, env, kind = localise(cmd, ws)
    if kind == "train" and "--print-config" not in argv:
        _set_aside(_run_dir(argv, ws.root))
    if kind == "eval" and argv[argv.index("run_eval.py") + 1] == "linear":  # ViT-S, ViT-B, SMD: alternatives
        weights = ws.root / _argument(argv, "--weights")
        _set_aside((weights if weights.is_dir() else weights.parent) / "linear")
    if kind == "eval" and argv[argv.index("run_eval.py") + 1] == "finetune":  # 1 process, or 8 GPUs
        _set_aside(ws.root / _recipe(ws.root / _argument(argv, "--config"))["train"]["output_dir"])
    if kind == "sbatch":
        ws.done[cmd.id] = subprocess.CompletedProcess([], 0)
        pytest.skip("sbatch: tests/test_slurm_cluster.py runs the script on a real two-node SLURM cluster")
    result = subprocess.run(argv, capture_output=True, text=True, cwd=str(ws.root), env=env, timeout=600)
    ws.done[cmd.id] = result
    errors = [line for line in result.stderr.splitlines() if re.search(r"\berror\b", line, re.I)][:8]
    assert result.returncode == 0, (f"{cmd.id}: {cmd.text}\nran: {shlex.join(argv)}\nexit {result.returncode}\n"
                                    + "\n".join(errors) + "\n" + result.stderr[-1500:])
    for path in written(argv, kind, ws.root, result):
        if str(path).startswith("s3:/"):  # an object on the moto server, asked for through its client
            url = "s3://" + str(path)[len("s3:/"):]
            listed = subprocess.run([str(VENV_BIN / "s5cmd"), "--endpoint-url", ws.env["S3_ENDPOINT_URL"], "ls", url],
                                    capture_output=True, text=True, env=ws.env)
            assert listed.returncode == 0, f"{cmd.id}: {url} not written ({listed.stderr.strip()})"
            continue
        assert path.is_file(), f"{cmd.id}: {path} not written"
    return result


# -- the tests -------------------------------------------------------------------------------------------


def test_every_page_is_collected():
    """Commands come from every page that has a bash block, none is a syntax synopsis
    (``[--option]``), and the skipped ones are a handful, each with its reason."""
    pages = {c.page for c in COMMANDS}
    assert {"README.md", "docs/cluster.md", "docs/configuration.md", "docs/data.md", "docs/training.md",
            "docs/evaluation.md"} <= pages
    assert not [c.id for c in COMMANDS if re.search(r"\s\[--?\w", c.text)], "an optional [--flag] is not a command"
    skipped = [c for c in COMMANDS if c.skip]
    assert len(skipped) <= 5 and all(c.skip for c in skipped)
    print(f"\n{len(COMMANDS)} documented commands, {len(skipped)} marked not run in tests, "
          f"{sum(c.text.startswith('sbatch') for c in COMMANDS)} sbatch lines skipped")


def _slow(cmd: Command) -> list:
    multi = cmd.text.startswith(("accelerate", "plans/", "selfdistill-plan"))  # 2 ranks, or probe processes
    return [pytest.mark.slow] if multi else []


@pytest.mark.parametrize("cmd", [pytest.param(c, id=c.id, marks=_slow(c)) for c in COMMANDS])
def test_documented_command(cmd: Command, workspace: Workspace):
    if cmd.skip:
        pytest.skip(f"{cmd.id}: not run in tests: {cmd.skip}")
    run(cmd, workspace)


def test_a_changed_flag_or_path_fails(workspace: Workspace):
    """The runner is not blind: a documented line with one flag misspelt, and one with a path that
    does not exist, each fail, naming the page and line (cheap lines: no training before them)."""
    config = next(c for c in COMMANDS if "--print-config" in c.text)
    verify = next(c for c in COMMANDS if c.text.startswith("selfdistill-shards verify"))
    for cmd, old, new, complaint in ((config, "--print-config", "--print-configs", "unrecognized arguments"),
                                     (verify, "imagenet-shards", "imagenet-shard", "no _info.json in")):
        broken = Command(cmd.page, cmd.line, cmd.text.replace(old, new))
        apart = Workspace(workspace.root, workspace.env, dict(workspace.done))  # the real results stay
        with pytest.raises(AssertionError, match=re.escape(f"{cmd.id}: {broken.text}")) as failed:
            run(broken, apart)
        assert complaint in str(failed.value)  # the command's own complaint, shown
