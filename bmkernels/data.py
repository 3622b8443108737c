"""Embedded datasets, read at run time from what is installed; nothing is downloaded.

Text: the Python standard library's own source files (the running interpreter's), as bytes
(vocabulary 256). Deterministic split by file: a file goes to validation when the CRC-32 of its
path relative to the stdlib directory is 0 mod 10, else to training (so no validation text was
seen in training, and the split does not depend on the order files are found in).

Why loading never blocks the kernels: the corpus is read once into one uint8 tensor in memory; a
batch is then a single index gather from it (microseconds, no disk I/O, no worker processes, no
queue to stall on), and which rows a step gets is a pure function of (seed, step), so resuming
and running distributed see exactly the same batches.
"""

import os
import sysconfig
import zlib

import torch

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_dir():
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root=None):
    """Relative paths of the stdlib's .py files (tests and third-party packages excluded), sorted."""
    root = root or stdlib_dir()
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        found += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith(".py")]
    if not found:
        raise RuntimeError(f"no Python source files found under the standard library directory {root!r}")
    return sorted(found)


def is_validation(relpath):
    return zlib.crc32(relpath.replace(os.sep, "/").encode()) % 10 == 0


def _read(root, relpath):
    with open(os.path.join(root, relpath), "rb") as f:
        return f.read()


def _as_tensor(chunks):
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def batch_generator(seed, step, stream):
    """The generator that draws step `step`'s rows: a pure function of (seed, step, stream)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 8 + stream)


class StdlibText:
    """Byte-level text of the standard library: .train and .val are uint8 tensors. max_bytes caps
    the training text (validation gets a tenth of it), reading files in sorted path order."""

    vocab_size = 256

    def __init__(self, max_bytes=2_000_000, root=None):
        root = root or stdlib_dir()
        caps = {"train": max_bytes, "val": max(max_bytes // 10, 1)}
        chunks, sizes = {"train": [], "val": []}, {"train": 0, "val": 0}
        for relpath in stdlib_files(root):
            split = "val" if is_validation(relpath) else "train"
            if sizes[split] >= caps[split]:
                continue
            text = _read(root, relpath)[: caps[split] - sizes[split]]
            chunks[split].append(text)
            sizes[split] += len(text)
        self.train, self.val = _as_tensor(chunks["train"]), _as_tensor(chunks["val"])

    def batch(self, split, batch_size, length, generator):
        """x (B, L) and y = x shifted by one (B, L), int64, from random offsets of `split`."""
        data = self.train if split == "train" else self.val
        if data.numel() <= length + 1:
            raise ValueError(f"{split} text has {data.numel()} bytes, too few for sequences of {length}")
        start = torch.randint(0, data.numel() - length - 1, (batch_size, 1), generator=generator)
        rows = data[start + torch.arange(length + 1)].long()
        return rows[:, :-1], rows[:, 1:]


class StdlibModuleSnippets:
    """Classification: which standard-library module a byte snippet comes from. The classes are the
    n_classes largest single-file modules at the top of the stdlib (ties by name); training
    snippets come from the first 90% of each file, validation snippets from the last 10%."""

    vocab_size = 256

    def __init__(self, n_classes=8, root=None):
        root = root or stdlib_dir()
        top_level = [p for p in stdlib_files(root) if os.sep not in p and not p.startswith("_")]
        sizes = {p: os.path.getsize(os.path.join(root, p)) for p in top_level}
        self.classes = sorted(top_level, key=lambda p: (-sizes[p], p))[:n_classes]
        if len(self.classes) < n_classes:
            raise RuntimeError(
                f"the standard library has only {len(self.classes)} top-level modules; asked for {n_classes} classes"
            )
        self.train, self.val = [], []
        for relpath in self.classes:
            text = _read(root, relpath)
            cut = len(text) * 9 // 10
            self.train.append(_as_tensor([text[:cut]]))
            self.val.append(_as_tensor([text[cut:]]))

    @property
    def n_classes(self):
        return len(self.classes)

    def batch(self, split, batch_size, length, generator):
        """x (B, L) int64 snippets and y (B,) their class, classes drawn uniformly."""
        texts = self.train if split == "train" else self.val
        labels = torch.randint(0, len(texts), (batch_size,), generator=generator)
        rows = []
        for label in labels.tolist():
            text = texts[label]
            if text.numel() < length:
                raise ValueError(
                    f"module {self.classes[label]} has too little {split} text for snippets of {length} bytes"
                )
            start = int(torch.randint(0, text.numel() - length + 1, (1,), generator=generator))
            rows.append(text[start : start + length])
        return torch.stack(rows).long(), labels


class Digits:
    """scikit-learn's bundled handwritten digits (1,797 8x8 grey images, 10 classes; shipped inside
    the package, nothing downloaded): .train / .val are (images (N, 1, 8, 8) float32 in [0, 1],
    labels (N,) int64). Deterministic split: every tenth image (index % 10 == 0) is validation.
    Held in memory; a batch is one index gather, rows a pure function of the generator."""

    n_classes = 10
    shape = (1, 8, 8)

    def __init__(self):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise RuntimeError(
                "the digits images come with scikit-learn: pip install 'bmkernels[images]' "
                "(or pip install scikit-learn)"
            ) from None
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.int64)
        val = torch.arange(len(labels)) % 10 == 0
        self.train, self.val = (images[~val], labels[~val]), (images[val], labels[val])

    def batch(self, split, batch_size, generator):
        """images (B, 1, 8, 8) and labels (B,), drawn with replacement from `split`."""
        images, labels = self.train if split == "train" else self.val
        rows = torch.randint(0, len(labels), (batch_size,), generator=generator)
        return images[rows], labels[rows]
