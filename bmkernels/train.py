"""Training on embedded data: `bmkernels train MODEL` and its Python API.

The loop, checkpoints, evaluation, progress bar, loss curve and distributed setup are shared by
every model; a model family adds a Trainer subclass (its CLI options, data, model and loss) and
one entry in TRAINERS.

- Checkpoints: OUT/checkpoint.pt, written atomically (a temporary file in OUT, fsync, rename),
  at every evaluation and at the end. `--resume` continues from it exactly (model, optimizer,
  step, RNG state; batches are a function of (seed, step)); the architecture, task and seed come
  from the checkpoint then (the learning-rate schedule follows the new --steps: the same --steps
  as the interrupted run continues it bit for bit). A fresh run refuses to start where a checkpoint exists (pass
  --overwrite), so no command loses one by accident.
- Distributed: under `torchrun --nproc_per_node=N` (WORLD_SIZE in the environment) the model is
  wrapped in DistributedDataParallel on the gloo backend (training runs on the CPU: the bmkernels
  attention has no GPU kernel in this build yet). --batch-size is the global
  batch: rank r trains on its slice of the same rows a single process would draw, so N processes
  follow the single-process run. Rank 0 evaluates, logs and writes files.
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from bmkernels import data as bmk_data
from bmkernels.models import CNN, GRULM, ConvAutoencoder, TransformerClassifier, TransformerLM

CHECKPOINT = "checkpoint.pt"
CURVE = "loss_curve.png"
FORMAT = "bmkernels-train-1"


class TrainError(RuntimeError):
    """A problem with the command line, a checkpoint or the output folder, said plainly."""


# ---------------------------------------------------------------------------------------- files


def save_checkpoint(path, payload):
    """torch.save to a temporary file next to `path`, fsync, then rename over `path`: a crash or
    a full disk leaves the previous checkpoint intact."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, model_name=None):
    """A checkpoint written by this module, checked; TrainError with the reason otherwise."""
    if not os.path.isfile(path):
        raise TrainError(f"checkpoint {path!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds on a damaged file
        raise TrainError(
            f"cannot read checkpoint {path!r} (damaged or not a bmkernels checkpoint): {type(e).__name__}: {e}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise TrainError(f"{path!r} is not a bmkernels training checkpoint (format {FORMAT})")
    problem = _payload_problem(payload)
    if problem:
        raise TrainError(f"checkpoint {path!r} is damaged or was edited: {problem}")
    if model_name is not None and payload["model_name"] != model_name:
        raise TrainError(f"checkpoint {path!r} is of a {payload['model_name']} model, not {model_name}")
    return payload


def _payload_problem(payload):
    """What is wrong with the structure of a checkpoint payload that torch.load read (None if nothing):
    an edited file can hold any pickle-safe values, and the loop must not fail on them half-way."""
    kinds = {"model_name": str, "config": dict, "step": int, "model": dict, "optimizer": dict, "history": dict}
    for key, kind in kinds.items():
        if not isinstance(payload.get(key), kind) or isinstance(payload.get(key), bool):
            return f"{key!r} must be a {kind.__name__}; got {type(payload.get(key)).__name__}"
    if payload["step"] < 0:
        return f"'step' must be >= 0; got {payload['step']}"
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["model"].items()):
        return "'model' must map parameter names to tensors"
    if not all(isinstance(payload["optimizer"].get(k), kind) for k, kind in (("state", dict), ("param_groups", list))):
        return "'optimizer' must hold 'state' (a dict) and 'param_groups' (a list)"
    if not all(isinstance(payload["history"].get(k), list) for k in ("train", "val")):
        return "'history' must hold 'train' and 'val' lists"
    rng = payload.get("rng")
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
        return f"'rng' must be a uint8 tensor (torch.get_rng_state()); got {type(rng).__name__}"
    return None


def plot_curves(history, path, title, ylabel="cross-entropy (nats)"):
    """Train and validation loss against step, as a PNG (needs matplotlib: the `train` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TrainError(
            "the loss-curve plot needs matplotlib (pip install 'bmkernels[train]'); or pass --no-plot"
        ) from None
    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        steps, losses = zip(*history["train"], strict=True)
        ax.plot(steps, losses, label="train", linewidth=0.8, alpha=0.7)
    if history["val"]:
        steps, losses = zip(*[(s, m["loss"]) for s, m in history["val"]], strict=True)
        ax.plot(steps, losses, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- progress


class Progress:
    """One status line on stderr: redrawn in place on a terminal, printed every ~10% otherwise."""

    def __init__(self, total, start, enabled, stream=sys.stderr):
        self.total, self.start, self.enabled, self.stream = total, start, enabled, stream
        self.tty = stream.isatty()
        self.every = max(1, (total - start) // 10)

    def update(self, step, text):
        if not self.enabled:
            return
        done = step - self.start
        if self.tty:
            width = 24
            filled = int(width * step / max(self.total, 1))
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r[{bar}] {step}/{self.total} {text}   ")
            self.stream.flush()
        elif done % self.every == 0 or step == self.total:
            self.stream.write(f"step {step}/{self.total} {text}\n")
            self.stream.flush()

    def message(self, text):
        if self.enabled:
            self.stream.write(("\r" if self.tty else "") + text + ("\n"))
            self.stream.flush()


# ---------------------------------------------------------------------------------- distributed


class Distributed:
    """rank/world from torchrun's environment; initialises the process group when world > 1."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = self.world > 1
        if self.active and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")

    @property
    def main(self):
        return self.rank == 0

    def shard(self, tensor):
        """This rank's rows of a global batch."""
        if not self.active:
            return tensor
        if tensor.shape[0] % self.world:
            raise TrainError(
                f"--batch-size {tensor.shape[0]} must be a multiple of the number of processes ({self.world})"
            )
        return tensor.chunk(self.world)[self.rank]

    def mean(self, value):
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.item() / self.world

    def barrier(self):
        if self.active:
            torch.distributed.barrier()

    def close(self):
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------- trainers


class Trainer:
    """What a model family supplies to the shared loop: its options, the config keys that fix its
    architecture and data (ARCH_KEYS: taken from the checkpoint on --resume and, where they shape
    parameters, from --init-from), the model, batches, the loss and validation metrics."""

    name = None
    summary = None  # one line for `bmkernels train --help`
    unit = "tokens"
    loss_label = "cross-entropy (nats)"
    ARCH_KEYS = ()

    @classmethod
    def add_arguments(cls, parser):
        """The family's own options (architecture, data, task)."""

    def __init__(self, config):
        self.config = config

    def build_model(self, kernels):
        raise NotImplementedError

    def batch(self, split, generator):
        raise NotImplementedError

    def loss(self, model, x, y):
        raise NotImplementedError

    def metrics(self, model, x, y):
        """Validation metrics of one batch (at least "loss")."""
        return {"loss": self.loss(model, x, y).item()}

    def items(self, x):
        """How many `unit`s one batch holds (for the throughput figure)."""
        return x.numel()

    def init_from(self, model, payload):
        """Initialise `model` from another run's checkpoint payload."""
        raise TrainError(f"--init-from is not supported for {self.name}")


class TransformerTrainer(Trainer):
    """Transformer on standard-library text: task "lm" (next byte) or "classify" (which module a
    snippet comes from; --init-from an LM checkpoint fine-tunes its pretrained blocks)."""

    name = "transformer"
    summary = "Transformer LM, or classifier fine-tuned from one, on Python standard-library text"
    ARCH_KEYS = ("task", "seq_len", "d_model", "n_heads", "n_layers", "positions", "dropout", "n_classes", "data_bytes")

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument(
            "--task",
            choices=("lm", "classify"),
            default="lm",
            help="lm: next-byte language model; classify: which stdlib module a snippet is from",
        )
        parser.add_argument("--seq-len", type=_positive_int, default=64, help="bytes per sequence (default 64)")
        parser.add_argument("--d-model", type=_positive_int, default=128, help="model width (default 128)")
        parser.add_argument("--n-heads", type=_positive_int, default=4, help="attention heads (default 4)")
        parser.add_argument("--n-layers", type=_positive_int, default=2, help="blocks (default 2)")
        parser.add_argument("--positions", choices=("sinusoidal", "learned"), default="sinusoidal")
        parser.add_argument("--dropout", type=_probability, default=0.0, help="dropout probability (default 0)")
        parser.add_argument(
            "--n-classes",
            type=_positive_int,
            default=8,
            help="classify: number of stdlib modules to tell apart (default 8)",
        )
        parser.add_argument(
            "--data-bytes",
            type=_positive_int,
            default=2_000_000,
            help="lm: bytes of stdlib source to train on (default 2000000)",
        )

    def __init__(self, config):
        super().__init__(config)
        if config["task"] == "lm":
            self.data = bmk_data.StdlibText(max_bytes=config["data_bytes"])
        else:
            self.data = bmk_data.StdlibModuleSnippets(n_classes=config["n_classes"])

    def build_model(self, kernels):
        c = self.config
        arch = dict(
            max_len=c["seq_len"],
            d_model=c["d_model"],
            n_heads=c["n_heads"],
            n_layers=c["n_layers"],
            dropout=c["dropout"],
            positions=c["positions"],
            kernels=kernels,
        )
        if c["task"] == "lm":
            return TransformerLM(vocab_size=self.data.vocab_size, **arch)
        return TransformerClassifier(self.data.n_classes, vocab_size=self.data.vocab_size, **arch)

    def batch(self, split, generator):
        return self.data.batch(split, self.config["batch_size"], self.config["seq_len"], generator)

    def loss(self, model, x, y):
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def metrics(self, model, x, y):
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
        if self.config["task"] == "lm":
            return {"loss": loss}
        return {"loss": loss, "accuracy": (logits.argmax(-1) == y).double().mean().item()}

    def init_from(self, model, payload):
        """Copies the pretrained backbone (embedding, positions, blocks, final norm); the head stays new."""
        source = {k: v for k, v in payload["model"].items() if k.startswith("backbone.")}
        target = model.state_dict()
        for key, value in source.items():
            if key not in target or target[key].shape != value.shape:
                have = tuple(target[key].shape) if key in target else "missing"
                raise TrainError(
                    f"--init-from: parameter {key} of shape {tuple(value.shape)} does not fit this "
                    f"model ({have}); use the same architecture flags as the pretraining run"
                )
        missing = [k for k in target if k.startswith("backbone.") and k not in source]
        if missing:
            raise TrainError(
                f"--init-from: the checkpoint lacks {', '.join(missing[:3])}; use the same "
                "architecture flags as the pretraining run"
            )
        model.load_state_dict(source, strict=False)
        return sorted(source)


class _DigitsTrainer(Trainer):
    """Shared by the image models: scikit-learn's handwritten digits (bmkernels.data.Digits)."""

    unit = "images"

    def __init__(self, config):
        super().__init__(config)
        try:
            self.data = bmk_data.Digits()
        except RuntimeError as e:
            raise TrainError(str(e)) from None

    def batch(self, split, generator):
        return self.data.batch(split, self.config["batch_size"], generator)

    def items(self, x):
        return x.shape[0]


class CNNTrainer(_DigitsTrainer):
    """ResNet-style CNN (bmkernels fused conv blocks) classifying scikit-learn's 8x8 handwritten digits."""

    name = "cnn"
    summary = "ResNet-style CNN classifier on scikit-learn's handwritten digits"
    ARCH_KEYS = ("widths", "blocks")

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument(
            "--widths",
            type=_widths,
            default=(16, 32, 64),
            help="channels per stage, comma-separated (default 16,32,64)",
        )
        parser.add_argument("--blocks", type=_positive_int, default=1, help="residual blocks per stage (default 1)")

    def build_model(self, kernels):
        return CNN(self.data.n_classes, self.data.shape[0], self.config["widths"], self.config["blocks"], kernels)

    def loss(self, model, x, y):
        return F.cross_entropy(model(x), y)

    def metrics(self, model, x, y):
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y).item(), "accuracy": (logits.argmax(-1) == y).double().mean().item()}


class AutoencoderTrainer(_DigitsTrainer):
    """Convolutional autoencoder (bmkernels fused conv blocks) reconstructing scikit-learn's 8x8 digits."""

    name = "autoencoder"
    summary = "convolutional autoencoder on scikit-learn's handwritten digits"
    loss_label = "mean squared error"
    ARCH_KEYS = ("widths",)

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument(
            "--widths",
            type=_widths,
            default=(16, 32),
            help="encoder channels per stride-2 stage, comma-separated (default 16,32; at most 3 "
            "stages for 8x8 images)",
        )

    def build_model(self, kernels):
        if 2 ** len(self.config["widths"]) > self.data.shape[-1]:
            raise TrainError(
                f"--widths: at most 3 stages for {self.data.shape[-1]}x{self.data.shape[-1]} images; "
                f"got {len(self.config['widths'])}"
            )
        return ConvAutoencoder(self.data.shape[0], self.config["widths"], kernels)

    def loss(self, model, x, y):
        return F.mse_loss(model(x), x)


class GRUTrainer(Trainer):
    """GRU language model (embedding -> bmkernels GRU -> head), next byte of standard-library source."""

    name = "gru"
    summary = "GRU language model on Python standard-library text"
    ARCH_KEYS = ("seq_len", "d_embed", "hidden_size", "n_layers", "dropout", "data_bytes")

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--seq-len", type=_positive_int, default=64, help="bytes per sequence (default 64)")
        parser.add_argument("--d-embed", type=_positive_int, default=64, help="byte embedding size (default 64)")
        parser.add_argument("--hidden-size", type=_positive_int, default=256, help="GRU state size (default 256)")
        parser.add_argument("--n-layers", type=_positive_int, default=2, help="GRU layers (default 2)")
        parser.add_argument(
            "--dropout",
            type=_probability,
            default=0.0,
            help="dropout between GRU layers and before the head (default 0)",
        )
        parser.add_argument(
            "--data-bytes",
            type=_positive_int,
            default=2_000_000,
            help="bytes of stdlib source to train on (default 2000000)",
        )

    def __init__(self, config):
        super().__init__(config)
        self.data = bmk_data.StdlibText(max_bytes=config["data_bytes"])

    def build_model(self, kernels):
        c = self.config
        return GRULM(self.data.vocab_size, c["d_embed"], c["hidden_size"], c["n_layers"], c["dropout"], kernels)

    def batch(self, split, generator):
        return self.data.batch(split, self.config["batch_size"], self.config["seq_len"], generator)

    loss = TransformerTrainer.loss


TRAINERS = {"transformer": TransformerTrainer}
TRAINERS.update({"cnn": CNNTrainer, "autoencoder": AutoencoderTrainer, "gru": GRUTrainer})


# ----------------------------------------------------------------------------------------- loop


def _checked(convert, ok, expectation):
    """An argparse type: convert(text), which must satisfy ok(value)."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expectation}; got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expectation}; got {text}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
_non_negative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_probability = _checked(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
_widths = _checked(
    lambda text: tuple(int(w) for w in text.split(",")),
    lambda v: len(v) >= 1 and min(v) >= 1,
    "comma-separated positive integers",
)


def add_common_arguments(parser):
    """Options of every `bmkernels train MODEL`."""
    parser.add_argument("--steps", type=_positive_int, default=300, help="optimizer steps in all (default 300)")
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        help="global batch (split over processes under torchrun; default 32)",
    )
    parser.add_argument("--lr", type=_positive_float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument(
        "--weight-decay", type=_non_negative_float, default=0.01, help="AdamW weight decay (default 0.01)"
    )
    parser.add_argument(
        "--warmup", type=_non_negative_int, default=20, help="linear warm-up steps, then cosine (default 20)"
    )
    parser.add_argument(
        "--eval-every", type=_positive_int, default=50, help="evaluate and checkpoint every N steps (default 50)"
    )
    parser.add_argument(
        "--eval-batches", type=_positive_int, default=8, help="validation batches per evaluation (default 8)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kernels",
        choices=("bmkernels", "torch"),
        default="bmkernels",
        help="bmkernels drop-ins or stock torch modules (same parameters; for A/B runs)",
    )
    parser.add_argument("--compile", action="store_true", help="train the torch.compile'd model")
    parser.add_argument("--out", metavar="DIR", help="output folder (default runs/MODEL-TASK)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true", help="start afresh even if OUT has a checkpoint")
    parser.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="initialise from another run's checkpoint (e.g. an LM to fine-tune as a classifier)",
    )
    parser.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-plot", action="store_true", help="skip the loss-curve PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def add_parsers(train_parser):
    """`bmkernels train MODEL ...` subcommands, one per entry of TRAINERS."""
    models = train_parser.add_subparsers(dest="model", metavar="MODEL", required=True)
    for name, trainer in TRAINERS.items():
        p = models.add_parser(name, help=trainer.summary, description=trainer.__doc__)
        trainer.add_arguments(p)
        add_common_arguments(p)
    return models


def _lr_at(step, config):
    """Linear warm-up to --lr, then cosine decay to a tenth of it."""
    peak, warmup, total = config["lr"], config["warmup"], config["steps"]
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _optimizer(model, config):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
        lr=config["lr"],
    )


def _evaluate(trainer, model, config):
    was_training = model.training
    model.eval()
    totals = {}
    with torch.no_grad():
        for i in range(config["eval_batches"]):
            x, y = trainer.batch("val", bmk_data.batch_generator(config["seed"], i, stream=1))
            for k, v in trainer.metrics(model, x, y).items():
                totals[k] = totals.get(k, 0.0) + v
    model.train(was_training)
    return {k: v / config["eval_batches"] for k, v in totals.items()}


def _prepare(args):
    """(config, out folder, resume payload or None, init payload or None) from the parsed args."""
    config = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    out = args.out or os.path.join("runs", f"{args.model}-{getattr(args, 'task', 'default')}")
    path = os.path.join(out, CHECKPOINT)
    trainer_cls = TRAINERS[args.model]
    resume = init = None
    if args.resume and args.init_from:
        raise TrainError(
            "--resume and --init-from exclude each other: resume continues this run, --init-from starts a new one"
        )
    if args.resume:
        resume = load_checkpoint(path, args.model)
        for key in trainer_cls.ARCH_KEYS + ("seed", "batch_size", "kernels"):
            value = resume["config"].get(key)
            if type(value) is not type(config[key]) and config[key] is not None:
                raise TrainError(
                    f"checkpoint {path!r} is damaged or was edited: config[{key!r}] must be a "
                    f"{type(config[key]).__name__}; got {value!r}"
                )
            config[key] = value
        if args.steps <= resume["step"]:
            raise TrainError(f"--steps {args.steps} is not beyond the checkpoint's step {resume['step']}")
    elif os.path.exists(path) and not args.overwrite:
        raise TrainError(
            f"{path!r} exists; pass --resume to continue it, or --overwrite (or another --out) to start afresh"
        )
    if args.init_from:
        init = load_checkpoint(args.init_from, args.model)
        for key in trainer_cls.ARCH_KEYS:
            if key not in ("task", "n_classes", "data_bytes"):
                config[key] = init["config"][key]
    if os.path.exists(out) and not os.path.isdir(out):
        raise TrainError(f"--out {out!r} exists and is not a folder")
    return config, out, resume, init


def run(args):
    """Train as `args` (the parsed command line) says; returns a summary dict (rank 0's view)."""
    config, out, resume, init = _prepare(args)
    dist = Distributed()
    try:
        return _train(config, out, resume, init, dist)
    finally:
        dist.close()


def _restore(path, resume, model, optimizer):
    """Model, optimizer and RNG state from a resume payload; TrainError naming `path` where they do
    not fit this model (an edited checkpoint), before any step runs or any file is written."""
    try:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        for param, state in optimizer.state.items():
            for name, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(
                        f"optimizer state {name!r} of shape {tuple(value.shape)} for a parameter of "
                        f"shape {tuple(param.shape)}"
                    )
        torch.set_rng_state(resume["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise TrainError(f"checkpoint {path!r} does not fit this model (damaged or edited): {e}") from None


def _train(config, out, resume, init, dist):
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    trainer = TRAINERS[config["model"]](config)
    torch.manual_seed(config["seed"])
    try:
        model = trainer.build_model(config["kernels"])
    except (RuntimeError, ValueError, TypeError, ZeroDivisionError) as e:
        if resume is None:
            raise
        raise TrainError(
            f"checkpoint {os.path.join(out, CHECKPOINT)!r}: its config builds no model (edited?): {e}"
        ) from None
    progress = Progress(config["steps"], resume["step"] if resume else 0, dist.main and not config["quiet"])
    if init is not None:
        loaded = trainer.init_from(model, init)
        progress.message(f"initialised {len(loaded)} tensors from {config['init_from']}")
    optimizer = _optimizer(model, config)
    history = {"train": [], "val": []}
    start = 0
    if resume is not None:
        _restore(os.path.join(out, CHECKPOINT), resume, model, optimizer)
        history, start = resume["history"], resume["step"]
        progress.message(f"resumed from {os.path.join(out, CHECKPOINT)} at step {start}")
    if dist.main:
        os.makedirs(out, exist_ok=True)
    model.train()
    run_model = torch.nn.parallel.DistributedDataParallel(model) if dist.active else model
    if config["compile"]:
        run_model = torch.compile(run_model)

    def checkpoint(step):
        if dist.main:
            save_checkpoint(
                os.path.join(out, CHECKPOINT),
                {
                    "format": FORMAT,
                    "model_name": config["model"],
                    "config": config,
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "history": history,
                    "rng": torch.get_rng_state(),
                },
            )
        dist.barrier()

    items, train_time, last = 0, 0.0, {}
    for step in range(start, config["steps"]):
        t0 = time.perf_counter()
        x, y = trainer.batch("train", bmk_data.batch_generator(config["seed"], step, stream=0))
        x, y = dist.shard(x), dist.shard(y)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        loss = trainer.loss(run_model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_value = dist.mean(loss.item())
        if step > start or step + 1 == config["steps"]:  # the first step warms up (compiles): not timed
            train_time += time.perf_counter() - t0
            items += trainer.items(x) * dist.world
        history["train"].append((step + 1, loss_value))
        if not math.isfinite(loss_value):
            raise TrainError(f"the loss became {loss_value} at step {step + 1}; try a lower --lr")
        if (step + 1) % config["eval_every"] == 0 or step + 1 == config["steps"]:
            if dist.main:
                last = _evaluate(trainer, model, config)
                history["val"].append((step + 1, last))
            checkpoint(step + 1)
        rate = items / train_time if train_time else 0.0
        shown = " ".join(f"val {k} {v:.3f}" for k, v in last.items())
        progress.update(step + 1, f"loss {loss_value:.3f} {shown} {rate:,.0f} {trainer.unit}/s")

    summary = {
        "steps": config["steps"],
        "kernels": config["kernels"],
        "out": out,
        f"{trainer.unit}_per_s": items / train_time if train_time else float("nan"),
        "first_loss": history["train"][0][1] if history["train"] else None,
        "final_train_loss": history["train"][-1][1] if history["train"] else None,
        "val": history["val"][-1][1] if history["val"] else None,
        "history": history,
    }
    if dist.main:
        if not config["no_plot"]:
            plot_curves(
                history,
                os.path.join(out, CURVE),
                f"{config['model']} {config.get('task', '')} ({config['kernels']} kernels)",
                trainer.loss_label,
            )
        progress.message(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    return summary
